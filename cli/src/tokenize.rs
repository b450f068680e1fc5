//! virsh's command-string syntax: words split on blanks, quotes and
//! backslash escapes as in a shell, commands separated by unquoted `;`.

/// Splits a command string into commands, each a list of words.
pub fn split_commands(input: &str) -> Result<Vec<Vec<String>>, String> {
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated single quote in command string".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch) => word.push(ch),
                            None => return Err("dangling backslash in command string".into()),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated double quote in command string".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(ch) => word.push(ch),
                    None => return Err("dangling backslash in command string".into()),
                }
            }
            ';' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            '#' if !in_word => {
                // A comment runs to the end of the line.
                for ch in chars.by_ref() {
                    if ch == '\n' {
                        break;
                    }
                }
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if !words.is_empty() {
        commands.push(words);
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_batches_and_respects_quotes() {
        let c = split_commands("define f.xml; dumpxml 'my vm' ;list --all").expect("split");
        assert_eq!(c, vec![vec!["define", "f.xml"], vec!["dumpxml", "my vm"], vec!["list", "--all"]]);
        let c = split_commands(r#"snapshot-create-as vm s1 "a; b" x\;y"#).expect("split");
        assert_eq!(c, vec![vec!["snapshot-create-as", "vm", "s1", "a; b", "x;y"]]);
        assert!(split_commands("dumpxml 'vm").is_err());
        assert_eq!(split_commands("  ; ;").expect("empty"), Vec::<Vec<String>>::new());
    }
}
