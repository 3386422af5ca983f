//! What `ctl status` shows of the NVMe interface: the controller's state,
//! its queues and counters ([`ControllerReport`]), and whether a vfio-user
//! client is connected ([`NvmeView`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::command::{admin_op, io_op};
use super::controller::{cc, csts, Controller, Tally};
use super::status::NvmeStatus;
use crate::vfio_user::VfioUserStats;

/// The controller at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ControllerReport {
    /// CC.EN.
    pub enabled: bool,
    /// CSTS.RDY.
    pub ready: bool,
    /// CSTS.CFS: why the controller stopped, until a reset.
    pub fatal: Option<String>,
    /// CSTS.SHST: "none", "occurring" or "complete".
    pub shutdown: &'static str,
    /// The I/O submission queues are served on threads of their own.
    pub queue_threads: bool,
    /// The host's buffers, while shadow doorbells are configured.
    pub shadow_doorbells: Option<ShadowReport>,
    pub submission_queues: Vec<SqReport>,
    pub completion_queues: Vec<CqReport>,
    pub counters: CountersReport,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShadowReport {
    pub doorbells: String,
    pub event_idx: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SqReport {
    pub qid: u16,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    pub cq: u16,
    /// Commands fetched and not yet completed: the queue's depth.
    pub in_flight: usize,
    /// A Delete I/O Submission Queue waits for them.
    pub deleting: bool,
    pub shadowed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CqReport {
    pub qid: u16,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    /// Entries posted and not yet consumed, by the head the controller knows.
    pub posted: u16,
    pub vector: Option<u16>,
    /// A submission queue waits for room here.
    pub awaited: bool,
    pub shadowed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CountersReport {
    pub admin_commands: u64,
    pub io_commands: u64,
    pub failed: u64,
    pub fatal: u64,
    pub stale_completions: u64,
    pub ignored_writes: u64,
    pub doorbell_errors: u64,
    pub sq_stalls: u64,
    pub resets: u64,
    pub mmio_doorbells: u64,
    pub shadow_updates: u64,
    pub dbbuf_configs: u64,
    /// Commands fetched, by opcode name (or `0x..` for one this controller
    /// does not know).
    pub admin_opcodes: BTreeMap<String, u64>,
    pub io_opcodes: BTreeMap<String, u64>,
    /// Completions posted, by status.
    pub statuses: BTreeMap<&'static str, u64>,
}

impl Controller {
    /// The controller's state, queues and counters now.
    pub fn report(&self) -> ControllerReport {
        let st = self.lock();
        let shutdown = match st.csts & csts::SHST_MASK {
            csts::SHST_OCCURRING => "occurring",
            csts::SHST_COMPLETE => "complete",
            _ => "none",
        };
        ControllerReport {
            enabled: st.cc & cc::EN != 0,
            ready: st.csts & csts::RDY != 0,
            fatal: st
                .fatal()
                .then(|| st.fault.map_or_else(|| "?".into(), |f| f.to_string())),
            shutdown,
            queue_threads: self.on_threads(),
            shadow_doorbells: st.shadow.map(|b| ShadowReport {
                doorbells: b.doorbells.to_string(),
                event_idx: b.event_idx.to_string(),
            }),
            submission_queues: st
                .sqs
                .iter()
                .flatten()
                .map(|sq| SqReport {
                    qid: sq.qid,
                    entries: sq.entries,
                    head: sq.head,
                    tail: sq.tail,
                    cq: sq.cqid,
                    in_flight: sq.in_flight.len(),
                    deleting: sq.deleting.is_some(),
                    shadowed: sq.shadow.is_some(),
                })
                .collect(),
            completion_queues: st
                .cqs
                .iter()
                .flatten()
                .map(|cq| CqReport {
                    qid: cq.qid,
                    entries: cq.entries,
                    head: cq.head,
                    tail: cq.tail,
                    posted: cq.posted(),
                    vector: cq.vector,
                    awaited: cq.awaited,
                    shadowed: cq.shadow.is_some(),
                })
                .collect(),
            counters: self.counters_report(),
        }
    }

    fn counters_report(&self) -> CountersReport {
        let c = &self.counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersReport {
            admin_commands: get(&c.admin_commands),
            io_commands: get(&c.io_commands),
            failed: get(&c.failed),
            fatal: get(&c.fatal),
            stale_completions: get(&c.stale_completions),
            ignored_writes: get(&c.ignored_writes),
            doorbell_errors: get(&c.doorbell_errors),
            sq_stalls: get(&c.sq_stalls),
            resets: get(&c.resets),
            mmio_doorbells: get(&c.mmio_doorbells),
            shadow_updates: get(&c.shadow_updates),
            dbbuf_configs: get(&c.dbbuf_configs),
            admin_opcodes: by_opcode(&c.admin_opcodes, admin_op::name),
            io_opcodes: by_opcode(&c.io_opcodes, io_op::name),
            statuses: c
                .statuses
                .counted()
                .into_iter()
                .filter_map(|(i, n)| NvmeStatus::ALL.get(i).map(|s| (s.name(), n)))
                .collect(),
        }
    }
}

fn by_opcode(tally: &Tally<256>, name: fn(u8) -> Option<&'static str>) -> BTreeMap<String, u64> {
    tally
        .counted()
        .into_iter()
        .filter_map(|(i, n)| {
            let op = u8::try_from(i).ok()?;
            Some((
                name(op).map_or_else(|| format!("{op:#04x}"), str::to_owned),
                n,
            ))
        })
        .collect()
}

/// The NVMe interface as the daemon's status shows it: the controller and
/// the vfio-user transport it is served on.
#[derive(Clone, Debug)]
pub struct NvmeView {
    pub controller: Arc<Controller>,
    pub transport: Arc<VfioUserStats>,
}

impl NvmeView {
    /// Whether a vfio-user client is connected now.
    pub fn connected(&self) -> bool {
        self.transport.connected.load(Ordering::Relaxed)
    }

    /// `status`'s `nvme` object.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "client_connected": self.connected(),
            "controller": self.controller.report(),
            "transport": self.transport.snapshot(),
        })
    }
}

#[cfg(test)]
mod tests {
    use nvme_model::LbaSize;

    use super::*;
    use crate::nvme::command::Sqe;
    use crate::nvme::controller::{reg, DOORBELLS};
    use crate::nvme::test_utils::*;

    fn read(cid: u16) -> Sqe {
        Sqe::new(io_op::READ, cid).with_nsid(1).with_prps(DATA, 0)
    }

    #[test]
    fn the_report_follows_the_controller() {
        let mut host = Host::new(identity(LbaSize::B4096));
        let r = host.ctrl.report();
        assert_eq!((r.enabled, r.ready, r.shutdown), (false, false, "none"));
        assert!(r.submission_queues.is_empty() && !r.queue_threads);

        let mut host_on = Host::probed_on(true, identity(LbaSize::B4096), 2, 16);
        assert!(host_on.ctrl.report().queue_threads);
        host_on.io(1, read(1));

        host.enable();
        host.create_pair(1, 16);
        host.handler
            .immediate
            .store(false, std::sync::atomic::Ordering::Relaxed);
        for cid in 0..3 {
            host.submit(1, read(cid));
        }
        host.submit(1, Sqe::new(0xee, 9).with_nsid(1));
        host.submit(1, read(1));
        let r = host.ctrl.report();
        assert!(r.enabled && r.ready && r.fatal.is_none());
        assert_eq!(r.submission_queues.len(), 2);
        let sq = &r.submission_queues[1];
        assert_eq!(
            (sq.qid, sq.entries, sq.cq, sq.in_flight, sq.tail),
            (1, 16, 1, 3, 5)
        );
        let cq = &r.completion_queues[1];
        assert_eq!(
            (cq.qid, cq.entries, cq.vector, cq.posted),
            (1, 16, Some(1), 2)
        );
        let c = &r.counters;
        assert_eq!(c.io_opcodes.get("read"), Some(&4));
        assert_eq!(c.io_opcodes.get("0xee"), Some(&1));
        assert_eq!(c.admin_opcodes.get("create-sq"), Some(&1));
        assert_eq!(c.statuses.get("invalid-opcode"), Some(&1));
        assert_eq!(c.statuses.get("command-id-conflict"), Some(&1));
        assert_eq!(c.mmio_doorbells, 5 + 2 + 2, "5 I/O, 2 admin tails, 2 heads");

        // A doorbell mistake: fatal, with the reason, until a reset.
        host.write32(DOORBELLS + 8, 99);
        let r = host.ctrl.report();
        assert_eq!(
            r.fatal.as_deref(),
            Some("Doorbell of queue 1 written with 99, past its 16 entries")
        );
        assert_eq!(r.counters.doorbell_errors, 1);
        host.write32(reg::CC, 0);
        let r = host.ctrl.report();
        assert!(r.fatal.is_none() && !r.enabled && r.submission_queues.is_empty());
        assert_eq!(r.counters.resets, 1);
    }
}
