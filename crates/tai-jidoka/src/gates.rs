//! Each engine's [`CommitGate`], kept by name across its incarnations (like
//! a public ETS table): an incarnation that is killed (no `post_stop`) or
//! gives up waiting for the ledger leaves its gate here with the commits
//! `andon_ledger` still holds, and the next incarnation waits for them
//! before it reads its checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use tai_core::msg::CommitGate;

static GATES: LazyLock<Mutex<HashMap<String, Arc<CommitGate>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The gate of engine `name`: the one an earlier incarnation left, or a new one.
pub(crate) fn gate(name: &str) -> Arc<CommitGate> {
    let mut gates = GATES.lock().expect("commit gates");
    match gates.get(name) {
        Some(gate) => gate.clone(),
        None => {
            let gate = Arc::new(CommitGate::default());
            gates.insert(name.to_string(), gate.clone());
            gate
        }
    }
}

/// An incarnation that ends with nothing pending (a stop, or a start that
/// failed) lets its gate go.
pub(crate) fn release(name: &str, gate: &Arc<CommitGate>) {
    let mut gates = GATES.lock().expect("commit gates");
    if gates
        .get(name)
        .is_some_and(|g| Arc::ptr_eq(g, gate) && g.pending() == 0)
    {
        gates.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gate_left_with_a_pending_commit_holds_the_next_incarnation_until_it_is_answered() {
        let first = gate("engine:gates-test:a");
        let commit = first.begin();
        // Killed: no release. The next incarnation finds the same gate.
        let next = gate("engine:gates-test:a");
        assert!(Arc::ptr_eq(&first, &next));
        assert_eq!(next.pending(), 1);
        let waiting = tokio::spawn({
            let next = next.clone();
            async move { next.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "settled with a commit pending");
        drop(commit); // the ledger answered it
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("settled once answered")
            .unwrap();
        // A release with nothing pending lets it go: the next start gets a new one.
        release("engine:gates-test:a", &next);
        assert!(!Arc::ptr_eq(&gate("engine:gates-test:a"), &next));
    }

    #[test]
    fn a_gate_with_a_commit_pending_is_kept_at_a_release() {
        let g = gate("engine:gates-test:b");
        let commit = g.begin();
        release("engine:gates-test:b", &g);
        assert!(Arc::ptr_eq(&gate("engine:gates-test:b"), &g));
        drop(commit);
        release("engine:gates-test:b", &g);
        assert!(!Arc::ptr_eq(&gate("engine:gates-test:b"), &g));
    }
}
