//! Waits that say what they wait for: a worker that has gone quiet tells the operator why, at least
//! every [`REPORT_EVERY`].

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a long wait is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Awaits `future`, logging at INFO every `every` while it is pending that the process is still
/// waiting for `what`.
pub async fn reported<F: Future>(what: &str, every: Duration, future: F) -> F::Output {
    tokio::pin!(future);
    let started = Instant::now();
    loop {
        tokio::select! {
            output = &mut future => return output,
            () = tokio::time::sleep(every) => {
                tracing::info!(
                    waiting_for = what,
                    waited_secs = started.elapsed().as_secs(),
                    "still waiting"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_long_wait_is_reported_and_a_short_one_is_not() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let every = Duration::from_millis(20);
        let long = reported("the window lock", every, async {
            tokio::time::sleep(Duration::from_millis(90)).await;
            7
        });
        assert_eq!(long.await, 7);
        let short = reported("the login", every, std::future::ready(()));
        short.await;
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.matches("the window lock").count() >= 2, "{log}");
        assert!(!log.contains("the login"), "{log}");
    }
}
