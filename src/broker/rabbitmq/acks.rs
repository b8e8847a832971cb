//! The acknowledgements of one channel, a batch's in as few frames as the channel allows.
//!
//! `basic.ack` with `multiple` acknowledges every unacknowledged delivery up to its tag on the
//! channel, those of other batches still being applied or retried included. So the channel's
//! unacknowledged tags are tracked: a batch's tags below the lowest tag that is still
//! outstanding elsewhere go in one `multiple` ack, the rest one by one. Under steady load
//! batches finish mostly in arrival order, and a batch is one frame. Acks are planned and sent
//! under one lock, so a `multiple` ack never overtakes the single ack of a tag it covers: a tag
//! acknowledged twice is a channel error, which would redeliver everything unacknowledged.

use std::collections::{BTreeMap, BTreeSet};

use lapin::Acker;
use lapin::options::BasicAckOptions;

/// One channel's unacknowledged deliveries, by tag. Their ackers, not the channel, are kept:
/// a delivery still held after its consumer stopped must not keep the connection open, or the
/// broker would not requeue what it had not acknowledged.
#[derive(Default)]
pub(super) struct ChannelAcks {
    unacked: tokio::sync::Mutex<BTreeMap<u64, Acker>>,
}

/// The frames that acknowledge a batch.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// One `multiple` ack up to this tag.
    up_to: Option<u64>,
    /// Then a single ack each.
    single: Vec<u64>,
}

/// How to acknowledge `batch` when the channel's unacknowledged tags are `unacked`. Tags not
/// in `unacked` (acknowledged already) are left out.
fn plan<V>(unacked: &BTreeMap<u64, V>, batch: &BTreeSet<u64>) -> Plan {
    let other = unacked.keys().find(|t| !batch.contains(t)).copied();
    let (below, single): (Vec<u64>, Vec<u64>) = batch
        .iter()
        .copied()
        .filter(|t| unacked.contains_key(t))
        .partition(|t| other.is_none_or(|o| *t < o));
    match below.as_slice() {
        [] => Plan {
            up_to: None,
            single,
        },
        [one] => Plan {
            up_to: None,
            single: std::iter::once(*one).chain(single).collect(),
        },
        [.., last] => Plan {
            up_to: Some(*last),
            single,
        },
    }
}

impl ChannelAcks {
    /// Records a delivery before it is handed to the consumer.
    pub(super) async fn delivered(&self, tag: u64, acker: Acker) {
        self.unacked.lock().await.insert(tag, acker);
    }

    /// Acknowledges `tags`, delivered on this channel.
    pub(super) async fn ack(&self, tags: &BTreeSet<u64>) -> Result<(), lapin::Error> {
        let mut unacked = self.unacked.lock().await;
        let plan = plan(&unacked, tags);
        // Forgotten whatever happens: a failed send means a dead channel, whose deliveries the
        // broker requeues.
        let mut ackers: BTreeMap<u64, Acker> = tags
            .iter()
            .filter_map(|t| unacked.remove(t).map(|a| (*t, a)))
            .collect();
        if let Some(acker) = plan.up_to.and_then(|t| ackers.remove(&t)) {
            acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        for acker in plan.single.iter().filter_map(|t| ackers.remove(t)) {
            acker.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    fn unacked(tags: &[u64]) -> BTreeMap<u64, ()> {
        tags.iter().map(|t| (*t, ())).collect()
    }

    #[test]
    fn a_batch_below_every_other_outstanding_tag_is_one_frame() {
        let unacked = unacked(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            plan(&unacked, &set(&[1, 2, 3])),
            Plan {
                up_to: Some(3),
                single: vec![]
            }
        );
        assert_eq!(
            plan(&unacked, &set(&[1, 2, 3, 4, 5, 6])),
            Plan {
                up_to: Some(6),
                single: vec![]
            },
            "nothing else outstanding"
        );
    }

    #[test]
    fn tags_past_another_batchs_outstanding_tag_go_one_by_one() {
        // 3 is still being applied (or retried) elsewhere: a multiple ack past it would
        // acknowledge it.
        let unacked = unacked(&[1, 2, 3, 4, 5]);
        assert_eq!(
            plan(&unacked, &set(&[1, 2, 4, 5])),
            Plan {
                up_to: Some(2),
                single: vec![4, 5]
            }
        );
        assert_eq!(
            plan(&unacked, &set(&[4, 5])),
            Plan {
                up_to: None,
                single: vec![4, 5]
            }
        );
    }

    #[test]
    fn one_tag_is_a_single_ack_and_an_acknowledged_tag_is_never_sent_again() {
        let unacked = unacked(&[2, 3]);
        assert_eq!(
            plan(&unacked, &set(&[2])),
            Plan {
                up_to: None,
                single: vec![2]
            }
        );
        assert_eq!(
            plan(&unacked, &set(&[1, 2, 3])),
            Plan {
                up_to: Some(3),
                single: vec![]
            },
            "1 was acknowledged already"
        );
    }
}
