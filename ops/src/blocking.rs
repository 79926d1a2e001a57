//! Blocking work (a file written and fsynced) called from async code.

/// Runs `f`, which blocks on the disk, without holding up the async runtime: on a
/// multi-threaded runtime the worker hands its other tasks (connections, timers) to
/// another thread for the duration, instead of leaving them unpolled while the disk
/// flushes (with one worker per core, that is half the runtime on 2 cores: keepalives
/// and calls time out under a burst of writes). On a current-thread runtime (some
/// tests), or outside any runtime, it just runs `f`.
pub fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_outside_a_runtime() {
        assert_eq!(off_the_runtime(|| 7), 7);
    }

    #[tokio::test]
    async fn runs_on_a_current_thread_runtime() {
        assert_eq!(off_the_runtime(|| 7), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_a_multi_threaded_runtime() {
        assert_eq!(off_the_runtime(|| 7), 7);
    }
}
