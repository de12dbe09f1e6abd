//! gen_statem helpers for actors: state timeouts that a state change cancels,
//! postponed events replayed after the next state change, and a marker of
//! state changes for enter actions.
//!
//! An actor keeps a [`Statem`] beside its own state. It asks
//! [`Statem::transition`] after each event; a change of state bumps the
//! generation (cancelling the state timeout, even one already queued in the
//! mailbox) and hands back the postponed events to replay.

use std::collections::VecDeque;
use std::time::Duration;

use ractor::{ActorRef, Message};
use tokio::task::JoinHandle;

/// Identifies one armed state timeout; stale ones are recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutToken {
    generation: u64,
    arm: u64,
}

/// What a transition changed.
#[derive(Debug)]
pub struct Transition<E> {
    /// The state is different: run enter actions.
    pub changed: bool,
    /// Postponed events, oldest first, to handle again in the new state.
    pub replay: Vec<E>,
}

#[derive(Debug)]
pub struct Statem<S, E> {
    state: S,
    generation: u64,
    arms: u64,
    armed: Option<(TimeoutToken, JoinHandle<()>)>,
    postponed: VecDeque<E>,
}

impl<S: PartialEq + Clone, E> Statem<S, E> {
    pub fn new(initial: S) -> Self {
        Statem {
            state: initial,
            generation: 0,
            arms: 0,
            armed: None,
            postponed: VecDeque::new(),
        }
    }

    pub fn state(&self) -> &S {
        &self.state
    }

    /// Moves to `next`. Same state: nothing happens (OTP's "keep_state").
    /// Another state: the state timeout is cancelled and postponed events come back.
    pub fn transition(&mut self, next: S) -> Transition<E> {
        if next == self.state {
            return Transition {
                changed: false,
                replay: Vec::new(),
            };
        }
        self.state = next;
        self.generation += 1;
        self.cancel_timeout();
        Transition {
            changed: true,
            replay: self.postponed.drain(..).collect(),
        }
    }

    /// Keeps `event` until the state changes.
    pub fn postpone(&mut self, event: E) {
        self.postponed.push_back(event);
    }

    pub fn postponed_len(&self) -> usize {
        self.postponed.len()
    }

    /// The events kept until the state changes, oldest first.
    pub fn postponed(&self) -> impl Iterator<Item = &E> {
        self.postponed.iter()
    }

    /// Arms the state timeout: after `after`, `make(token)` is sent to `myself`
    /// unless the state changes first. Re-arming replaces the previous one.
    pub fn set_state_timeout<M: Message>(
        &mut self,
        myself: &ActorRef<M>,
        after: Duration,
        make: impl FnOnce(TimeoutToken) -> M + Send + 'static,
    ) -> TimeoutToken {
        self.cancel_timeout();
        self.arms += 1;
        let token = TimeoutToken {
            generation: self.generation,
            arm: self.arms,
        };
        let me = myself.clone();
        let handle = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = me.send_message(make(token));
        });
        self.armed = Some((token, handle));
        token
    }

    /// Whether a timeout message that arrived is still the armed one. A stale
    /// one (its state left, or re-armed since) must be ignored.
    pub fn take_timeout(&mut self, token: TimeoutToken) -> bool {
        match &self.armed {
            Some((armed, _)) if *armed == token && token.generation == self.generation => {
                self.armed = None;
                true
            }
            _ => false,
        }
    }

    pub fn cancel_timeout(&mut self) {
        if let Some((_, handle)) = self.armed.take() {
            handle.abort();
        }
    }
}

impl<S, E> Drop for Statem<S, E> {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.armed.take() {
            handle.abort();
        }
    }
}
