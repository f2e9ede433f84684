//! The start barrier of the vcpu threads.

use std::sync::{Condvar, Mutex};

/// A start barrier that can be cancelled, so a failed start never leaves
/// threads waiting forever.
pub struct StartBarrier {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl StartBarrier {
    pub fn new(n: usize) -> Self {
        StartBarrier {
            state: Mutex::new((n, false)),
            cv: Condvar::new(),
        }
    }

    /// Waits until all parties arrived (true) or the barrier was cancelled.
    pub fn wait(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.cv.notify_all();
        }
        while st.0 > 0 && !st.1 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.1
    }

    pub fn cancel(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        self.cv.notify_all();
    }
}
