//! gen_statem helpers inside a real actor: state timeouts cancelled by a
//! state change (even when already queued), postponed events replayed.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tai_otp::statem::{Statem, TimeoutToken};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Light {
    Waiting,
    Open,
    TimedOut,
}

enum Msg {
    Work(u32),
    Open,
    Timeout(TimeoutToken),
    Get(RpcReplyPort<(Light, Vec<u32>)>),
}

struct Door;

struct State {
    sm: Statem<Light, u32>,
    done: Vec<u32>,
}

impl Actor for Door {
    type Msg = Msg;
    type State = State;
    type Arguments = Duration;

    async fn pre_start(
        &self,
        me: ActorRef<Msg>,
        after: Duration,
    ) -> Result<State, ActorProcessingErr> {
        let mut sm = Statem::new(Light::Waiting);
        sm.set_state_timeout(&me, after, Msg::Timeout);
        Ok(State {
            sm,
            done: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Msg>,
        msg: Msg,
        st: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Work(n) if *st.sm.state() == Light::Waiting => st.sm.postpone(n),
            Msg::Work(n) => st.done.push(n),
            Msg::Open => {
                let t = st.sm.transition(Light::Open);
                assert!(t.changed);
                st.done.extend(t.replay);
            }
            Msg::Timeout(token) => {
                if st.sm.take_timeout(token) {
                    let t = st.sm.transition(Light::TimedOut);
                    st.done.extend(t.replay);
                }
            }
            Msg::Get(reply) => {
                let _ = reply.send((*st.sm.state(), st.done.clone()));
            }
        }
        Ok(())
    }
}

async fn get(door: &ActorRef<Msg>) -> (Light, Vec<u32>) {
    ractor::call!(door, Msg::Get).unwrap()
}

#[tokio::test(start_paused = true)]
async fn postponed_events_replay_in_order_after_the_state_changes() {
    let (door, _) = Actor::spawn(None, Door, Duration::from_secs(30))
        .await
        .unwrap();
    for n in [1, 2, 3] {
        door.send_message(Msg::Work(n)).unwrap();
    }
    assert_eq!(get(&door).await, (Light::Waiting, vec![]));
    door.send_message(Msg::Open).unwrap();
    door.send_message(Msg::Work(4)).unwrap();
    assert_eq!(get(&door).await, (Light::Open, vec![1, 2, 3, 4]));
    // The state timeout was cancelled by the change: it never fires.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(get(&door).await.0, Light::Open);
}

#[tokio::test(start_paused = true)]
async fn state_timeout_fires_when_the_state_holds() {
    let (door, _) = Actor::spawn(None, Door, Duration::from_secs(30))
        .await
        .unwrap();
    door.send_message(Msg::Work(7)).unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(get(&door).await, (Light::TimedOut, vec![7]));
}

#[test]
fn a_stale_timeout_already_queued_is_ignored() {
    // The token of a timeout armed in a state that has since been left does
    // not match, even if its message is already in the mailbox.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (door, _) = Actor::spawn(None, Door, Duration::from_secs(1))
            .await
            .unwrap();
        let mut probe: Statem<Light, u32> = Statem::new(Light::Waiting);
        let token = probe.set_state_timeout(&door, Duration::from_secs(3600), Msg::Timeout);
        probe.transition(Light::Open);
        assert!(!probe.take_timeout(token));
        let again = probe.set_state_timeout(&door, Duration::from_secs(3600), Msg::Timeout);
        let newer = probe.set_state_timeout(&door, Duration::from_secs(3600), Msg::Timeout);
        assert!(
            !probe.take_timeout(again),
            "re-armed: the older token is stale"
        );
        assert!(probe.take_timeout(newer));
    });
}
