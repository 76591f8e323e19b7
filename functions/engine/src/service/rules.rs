//! The engine's decisions about time and failure, as pure functions: what the run loop and
//! the intake ask, tested here without a server.

use std::time::Duration;

use super::{EARLY_TASKS_WITHIN, Error};

/// Whether a stored outbox written `age` ago is published again when its run is loaded
/// from the store: while the streams still drop repeats (`dedup_within`, half their
/// duplicate window), or when the event being applied is the one that produced it (its
/// writer never acknowledged it, so may not have published).
pub fn republish_outbox(age: Duration, dedup_within: Duration, is_cause: bool) -> bool {
    age < dedup_within || is_cause
}

/// Whether tasks go out before the state that starts them is written: only from a state
/// known current within the last minute, and well inside the duplicate window, so that a
/// repeat after a lost compare-and-set is still dropped by the server.
pub fn send_tasks_early(known_for: Duration, dedup_within: Duration) -> bool {
    known_for < EARLY_TASKS_WITHIN.min(dedup_within)
}

/// What to do with a stored message the engine could not handle: `None` to try again later
/// (with [`super::backoff`]), or the reason it is dead-lettered. A result ahead of its run is
/// held for `hold_limit` of the message's age; transient trouble is retried however long it
/// lasts; anything else will not get better.
pub fn give_up(e: &Error, age: Duration, hold_limit: Duration) -> Option<String> {
    match e {
        Error::Ahead { .. } if age >= hold_limit => Some(format!(
            "held {}s and the run never reached this attempt: {e}",
            age.as_secs()
        )),
        e if e.is_transient() => None,
        e => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn an_outbox_is_published_again_only_while_repeats_are_dropped_or_for_its_cause() {
        let window = 5 * MIN;
        assert!(republish_outbox(Duration::from_secs(2), window, false));
        assert!(
            !republish_outbox(11 * MIN, window, false),
            "after the window"
        );
        assert!(
            republish_outbox(11 * MIN, window, true),
            "its cause redelivered"
        );
    }

    #[test]
    fn tasks_go_out_early_only_from_a_fresh_state_inside_the_window() {
        assert!(send_tasks_early(Duration::from_millis(5), 5 * MIN));
        assert!(!send_tasks_early(2 * MIN, 5 * MIN), "older than a minute");
        assert!(
            !send_tasks_early(Duration::from_secs(2), Duration::from_secs(1)),
            "a short duplicate window shortens it"
        );
    }

    #[test]
    fn only_what_cannot_get_better_is_given_up() {
        let hour = 60 * MIN;
        let ahead = Error::Ahead {
            run: "t.r".into(),
            at: "a-i-1-l-1-a1".into(),
        };
        assert_eq!(give_up(&ahead, MIN, hour), None, "held");
        assert!(give_up(&ahead, 2 * hour, hour).is_some(), "held too long");
        let store = Error::Store(crate::store::StoreError("timed out".into()));
        assert_eq!(
            give_up(&store, 10 * hour, hour),
            None,
            "a slow store never drops"
        );
        let corrupt = Error::Corrupt {
            what: "run state t.r".into(),
            message: "bad".into(),
        };
        assert!(give_up(&corrupt, Duration::ZERO, hour).is_some());
    }
}
