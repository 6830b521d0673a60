//! Free loopback ports for the servers a test starts.

use std::net::TcpListener;

/// A free loopback port for a server a test starts. Taken below the kernel's ephemeral range
/// (32768-60999 here), where no outgoing connection is given one, and handed out once per test
/// process, so two servers of one run never race for the same port (ports the kernel picks for
/// `bind(0)` can be handed out again as soon as they are released; a CI run once saw a server fail
/// to listen on one and its test talk to another test's server). Each process starts at its own
/// offset; a port found in use is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    loop {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
