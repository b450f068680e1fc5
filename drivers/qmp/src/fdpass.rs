//! Sending a file descriptor with SCM_RIGHTS (for QMP `getfd`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// Sends `data` on the stream socket `sock` with `fd` attached as SCM_RIGHTS
/// ancillary data. Returns how many bytes of `data` were sent; the kernel
/// attaches the descriptor to the first byte, so the caller may send the rest
/// without it. The socket is non-blocking: `WouldBlock` is returned as is.
pub(crate) fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    // One descriptor; the size of an int always fits in c_uint.
    const FD_LEN: libc::c_uint = std::mem::size_of::<RawFd>() as libc::c_uint;

    // u64 elements give the buffer the alignment of `cmsghdr` (whose first
    // member is size_t-sized on Linux), which CMSG_FIRSTHDR/CMSG_DATA assume.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only does arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(FD_LEN) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(io::Error::other("SCM_RIGHTS control message larger than expected"));
    }

    let mut iov = libc::iovec {
        // sendmsg never writes through iov_base; the type is mut only because
        // the same struct is used by recvmsg.
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid
    // (empty) value; the fields that matter are filled in right below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // The field's integer type differs between libcs (size_t vs socklen_t);
    // `space` was checked above to be a few dozen bytes.
    msg.msg_controllen = space as _;

    // SAFETY: msg_control/msg_controllen describe `control`, which lives for
    // this whole function and is at least `space` bytes, so CMSG_FIRSTHDR only
    // reads the msghdr and returns a pointer into `control` (or null).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::other("no room for the SCM_RIGHTS header"));
    }
    // SAFETY: `cmsg` is non-null and points at the start of `control`, which
    // is aligned for cmsghdr and holds CMSG_SPACE(FD_LEN) bytes: room for the
    // header plus one descriptor. CMSG_DATA may be unaligned for an int, hence
    // write_unaligned.
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_LEN) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }

    // SAFETY: `msg` points at `iov` (which points into `data`) and at
    // `control`, all alive for the duration of the call and not retained by
    // the kernel afterwards; `sock` and `fd` are open descriptors borrowed for
    // this call. MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    // A negative return value means failure, with the reason in errno.
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}
