//! Shadow doorbells (NVMe 1.3, 5.7 Doorbell Buffer Config and 7.13): the
//! host keeps each I/O queue's SQ tail and CQ head in a page of its own
//! memory, the *Shadow Doorbell* buffer, and rings the doorbell register
//! only when the controller asks to be told, through a second page, the
//! *EventIdx* buffer. Both pages have a slot per doorbell, laid out as the
//! doorbell registers are (CAP.DSTRD 0: the SQ tail of queue `y` at `8y`,
//! its CQ head at `8y + 4`).
//!
//! The host's side, as Linux's `nvme_dbbuf_update_and_check_event` does it:
//! write the new value to the shadow slot, a full barrier, read the
//! EventIdx slot, and ring the register only if the new value went past
//! the EventIdx since the old one ([`need_event`]).
//!
//! The controller's side, here and in [`super::controller`]:
//!
//! - It reads the shadow slots of an I/O queue whenever it looks at the
//!   queue: an SQ when it fetches (on a doorbell write or on its thread), a
//!   CQ on a head doorbell write and when a submission queue finds it full.
//!   A doorbell register write to a shadowed queue only says "look": its
//!   value may be older than the slot's (the write crossed the socket while
//!   the host went on), and is not used.
//! - SQ EventIdx: the tail the controller has fetched up to, written when it
//!   runs out of commands. The host then rings for its next command; while
//!   the controller is still fetching, the EventIdx stays behind the host's
//!   tail and the host does not ring.
//! - CQ EventIdx: the controller's tail, written before each entry is
//!   posted: the host's head never passes it, so the host never rings,
//!   unless a submission queue is waiting for room in the queue. Then the
//!   EventIdx is the head the controller knows, and the host's next head
//!   rings.
//! - Each EventIdx write is followed by a full fence and a second read of
//!   the shadow slot: the host may have written the slot after the first
//!   read and read the EventIdx before the write, and then it did not ring.
//!   One side always sees the other's write (the host's barrier pairs with
//!   this fence).
//!
//! The admin queue stays on its doorbell registers: Linux and SPDK never
//! shadow it. A controller reset forgets the buffers.

use std::sync::atomic::Ordering;

use dma::Gpa;
use log::debug;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::command::Sqe;
use super::controller::{Controller, Disposition, MappedMemory, State};
use super::prp::PAGE;
use super::status::NvmeStatus;

/// The most queue identifiers whose doorbell slots fit one page: a
/// controller with more I/O queues does not offer the command (5.7: the
/// slots of every queue must fit the page).
pub const MAX_SHADOWED_QID: u16 = 511;

/// The host's two buffers, as Doorbell Buffer Config gave them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowBuffers {
    pub doorbells: Gpa,
    pub event_idx: Gpa,
}

impl ShadowBuffers {
    /// The slots of submission queue `qid`'s tail doorbell; `None` for the
    /// admin queue.
    pub fn sq(&self, qid: u16) -> Option<ShadowSlot> {
        self.slot(qid, 0)
    }

    /// The slots of completion queue `qid`'s head doorbell; `None` for the
    /// admin queue.
    pub fn cq(&self, qid: u16) -> Option<ShadowSlot> {
        self.slot(qid, 4)
    }

    fn slot(&self, qid: u16, offset: u64) -> Option<ShadowSlot> {
        if qid == 0 || qid > MAX_SHADOWED_QID {
            return None;
        }
        let at = u64::from(qid) * 8 + offset;
        Some(ShadowSlot {
            doorbell: self.doorbells.checked_add(at)?,
            event_idx: self.event_idx.checked_add(at)?,
        })
    }
}

/// One doorbell's slot in each buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowSlot {
    pub doorbell: Gpa,
    pub event_idx: Gpa,
}

impl ShadowSlot {
    /// The host's latest value, read at once with acquire ordering: the
    /// entries it announces were written before it.
    pub fn doorbell<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u32, Gpa> {
        mem.load::<u32>(GuestAddress::from(self.doorbell), Ordering::Acquire)
            .map(u32::from_le)
            .map_err(|_| self.doorbell)
    }

    /// Sets the shadow value: only for a queue the host cannot have used
    /// yet, or one whose value the controller knows (when the buffers are
    /// configured).
    pub fn set_doorbell<M: GuestMemoryBackend>(&self, mem: &M, value: u16) -> Result<(), Gpa> {
        mem.store(
            u32::from(value).to_le(),
            GuestAddress::from(self.doorbell),
            Ordering::Release,
        )
        .map_err(|_| self.doorbell)
    }

    /// Writes the EventIdx: the host rings when its value goes past it.
    pub fn set_event_idx<M: GuestMemoryBackend>(&self, mem: &M, value: u16) -> Result<(), Gpa> {
        mem.store(
            u32::from(value).to_le(),
            GuestAddress::from(self.event_idx),
            Ordering::Release,
        )
        .map_err(|_| self.event_idx)
    }
}

/// Whether a host moving a doorbell from `old` to `new` must ring the
/// register, with `event_idx` in the EventIdx slot: whether `new` went past
/// `event_idx` (Linux's `nvme_dbbuf_need_event`, virtio's
/// `vring_need_event`).
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Controller {
    /// Doorbell Buffer Config (NVMe 1.3, 5.7): PRP1 the Shadow Doorbell
    /// buffer, PRP2 the EventIdx buffer, each one page of host memory. The
    /// I/O queues that exist take their slots now, each slot set to what the
    /// controller knows (QEMU's hw/nvme does the same); queues created later
    /// take theirs when created.
    pub(super) fn doorbell_buffer_config(
        &self,
        st: &mut State,
        mem: &MappedMemory,
        sqe: &Sqe,
    ) -> Disposition {
        if !self.identity.doorbell_buffer {
            return NvmeStatus::InvalidOpcode.into();
        }
        let buffers = ShadowBuffers {
            doorbells: Gpa(sqe.prp1()),
            event_idx: Gpa(sqe.prp2()),
        };
        let page = usize::try_from(PAGE).unwrap_or(4096);
        let usable = |gpa: Gpa| gpa.0.is_multiple_of(PAGE) && mem.check_range(gpa.into(), page);
        // "Invalid Field in Command if the buffer addresses are invalid": not
        // a page, outside memory, or one page for both (the controller's
        // EventIdx writes would overwrite the host's doorbells).
        if !usable(buffers.doorbells)
            || !usable(buffers.event_idx)
            || buffers.doorbells == buffers.event_idx
        {
            self.guest_error(format_args!(
                "q=0 cid={} doorbell buffer config: buffers {} and {} are not two pages of memory",
                sqe.cid(),
                buffers.doorbells,
                buffers.event_idx
            ));
            return NvmeStatus::InvalidField.into();
        }
        if let Err(gpa) = attach(st, mem, buffers) {
            // Checked above: only a memory map changing under the command.
            self.guest_error(format_args!("doorbell buffer at {gpa} unreachable"));
            return NvmeStatus::InvalidField.into();
        }
        st.shadow = Some(buffers);
        crate::counters::bump(&self.counters.dbbuf_configs);
        debug!(
            "nvme: shadow doorbells at {}, EventIdx at {}",
            buffers.doorbells, buffers.event_idx
        );
        NvmeStatus::Success.into()
    }
}

/// Gives every I/O queue its slots, set to what the controller knows: the
/// SQ tail (and EventIdx there, so the next command rings), the CQ head
/// (and EventIdx at the tail, or at the head if a queue waits for room).
fn attach(st: &mut State, mem: &MappedMemory, buffers: ShadowBuffers) -> Result<(), Gpa> {
    for sq in st.sqs.iter_mut().flatten() {
        sq.shadow = buffers.sq(sq.qid);
        if let Some(slot) = sq.shadow {
            slot.set_doorbell(mem, sq.tail)?;
            slot.set_event_idx(mem, sq.tail)?;
        }
    }
    for cq in st.cqs.iter_mut().flatten() {
        cq.shadow = buffers.cq(cq.qid);
        if let Some(slot) = cq.shadow {
            slot.set_doorbell(mem, cq.head)?;
            let at = if cq.awaited { cq.head } else { cq.tail };
            slot.set_event_idx(mem, at)?;
        }
    }
    Ok(())
}

/// Slots for a queue created while the buffers are configured: its value
/// and EventIdx start at 0, where the host's count starts.
pub(super) fn new_queue_slot(
    slot: Option<ShadowSlot>,
    mem: &MappedMemory,
) -> Result<Option<ShadowSlot>, Gpa> {
    if let Some(slot) = slot {
        slot.set_doorbell(mem, 0)?;
        slot.set_event_idx(mem, 0)?;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use nvme_model::LbaSize;

    use super::*;
    use crate::nvme::command::{admin_op, io_op};
    use crate::nvme::controller::{csts, reg, DOORBELLS};
    use crate::nvme::test_utils::*;
    use crate::nvme_driver::command::doorbell_buffer_config;
    use crate::nvme_driver::ring_doorbell;

    /// Where the tests keep the two buffers.
    const DBS: u64 = 0x9_0000;
    const EIS: u64 = 0x9_1000;

    /// The command as the driver builds it, with any two addresses.
    fn config(dbs: u64, eis: u64) -> Sqe {
        doorbell_buffer_config(ShadowBuffers {
            doorbells: Gpa(dbs),
            event_idx: Gpa(eis),
        })
    }

    fn read(cid: u16) -> Sqe {
        Sqe::new(io_op::READ, cid)
            .with_nsid(1)
            .with_prps(DATA, 0)
            .with_cdw(10, u32::from(cid))
    }

    fn u32_at(host: &Host, at: u64) -> u32 {
        u32::from_le_bytes(host.read_mem(at, 4).try_into().unwrap())
    }

    fn sq_slot(qid: u16) -> u64 {
        u64::from(qid) * 8
    }

    fn cq_slot(qid: u16) -> u64 {
        sq_slot(qid) + 4
    }

    /// A host with queue pair 1 of `entries` and the buffers configured
    /// (over pages of junk: configuring sets every slot the controller
    /// uses), which does its side as Linux's nvme driver does.
    struct Shadowed {
        host: Host,
        entries: u16,
        sq_tail: u16,
        cq_head: u16,
        phase: bool,
    }

    impl Shadowed {
        fn new(threads: bool, entries: u16) -> Shadowed {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, entries);
            host.write_mem(DBS, &[0xee; 4096]);
            host.write_mem(EIS, &[0xee; 4096]);
            let c = host.admin(config(DBS, EIS));
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            Shadowed {
                host,
                entries,
                sq_tail: 0,
                cq_head: 0,
                phase: true,
            }
        }

        fn sq_event_idx(&self) -> u32 {
            u32_at(&self.host, EIS + sq_slot(1))
        }

        fn cq_event_idx(&self) -> u32 {
            u32_at(&self.host, EIS + cq_slot(1))
        }

        /// The driver's side of the doorbell at `slot` (the host's, as
        /// Linux's): the shadow slot, and the register if the EventIdx asks.
        /// Returns whether it rang.
        fn update(&self, slot: u64, old: u16, new: u16) -> bool {
            let shadow = ShadowSlot {
                doorbell: Gpa(DBS + slot),
                event_idx: Gpa(EIS + slot),
            };
            let t = self.host.driver.transport();
            let ring = ring_doorbell(t, DOORBELLS + slot, Some(shadow), Some(old), new).unwrap();
            self.host.settle();
            ring
        }

        /// Places `sqe` at the tail and updates the tail; whether it rang.
        fn submit(&mut self, sqe: Sqe) -> bool {
            self.host.place(1, sqe);
            let old = self.sq_tail;
            self.sq_tail = (old + 1) % self.entries;
            self.update(sq_slot(1), old, self.sq_tail)
        }

        /// Every new completion by its phase tag, without telling the
        /// controller.
        fn take(&mut self) -> Vec<Completion> {
            let mut got = Vec::new();
            loop {
                let at = cq_base(1) + u64::from(self.cq_head) * 16;
                let entry: [u8; 16] = self.host.read_mem(at, 16).try_into().unwrap();
                let c = Completion::parse(&entry);
                if c.phase != self.phase {
                    return got;
                }
                got.push(c);
                self.cq_head = (self.cq_head + 1) % self.entries;
                if self.cq_head == 0 {
                    self.phase = !self.phase;
                }
            }
        }

        /// Takes the new completions and updates the head; the completions
        /// and whether it rang.
        fn reap(&mut self) -> (Vec<Completion>, bool) {
            let old = self.cq_head;
            let got = self.take();
            let rang = !got.is_empty() && self.update(cq_slot(1), old, self.cq_head);
            (got, rang)
        }
    }

    #[test]
    fn need_event_is_linuxs() {
        // The host moves from 3 to 5: it rings if the EventIdx is 3 or 4.
        assert!(need_event(3, 5, 3));
        assert!(need_event(4, 5, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(2, 5, 3));
        // Across the wrap of an 8-entry ring: 6 → 1 crosses 6, 7 and 0.
        for ei in [6, 7, 0] {
            assert!(need_event(ei, 1, 6), "{ei}");
        }
        for ei in [1, 2, 5] {
            assert!(!need_event(ei, 1, 6), "{ei}");
        }
        // Nothing moved: never.
        assert!(!need_event(3, 3, 3));
    }

    #[test]
    fn the_command_is_offered_and_takes_two_distinct_pages() {
        let mut host = Host::probed(identity(LbaSize::B4096), 1, 8);
        let c = host.admin(
            Sqe::new(admin_op::IDENTIFY, 0)
                .with_prps(ADMIN_BUF, 0)
                .with_cdw(10, 1),
        );
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        let id = host.read_mem(ADMIN_BUF, 4096);
        assert_eq!(
            u16::from_le_bytes([id[256], id[257]]),
            1 << 8,
            "OACS: Doorbell Buffer Config alone"
        );

        let refused = [
            ("shadow buffer not page-aligned", config(DBS + 8, EIS)),
            ("EventIdx buffer not page-aligned", config(DBS, EIS + 0x800)),
            ("one page for both", config(DBS, DBS)),
            ("outside memory", config(DBS, 1 << 40)),
            ("the page past the end", config(DBS, MEM_SIZE as u64)),
            ("an SGL", config(DBS, EIS).with_flags(0x40)),
        ];
        for (what, sqe) in refused {
            let c = host.admin(sqe);
            assert_eq!(c.status(), Some(NvmeStatus::InvalidField), "{what}");
            assert!(c.dnr(), "{what}");
        }
        assert!(host.ctrl.lock().shadow.is_none());
        assert!(host.ctrl.lock().sq(1).unwrap().shadow.is_none());
        assert_eq!(host.ctrl.counters().dbbuf_configs.load(Relaxed), 0);
        let c = host.admin(config(DBS, EIS));
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        assert_eq!(host.ctrl.counters().dbbuf_configs.load(Relaxed), 1);
        assert_eq!(
            host.ctrl.lock().shadow,
            Some(ShadowBuffers {
                doorbells: Gpa(DBS),
                event_idx: Gpa(EIS)
            })
        );

        // A controller that does not offer it.
        let mut id = identity(LbaSize::B4096);
        id.doorbell_buffer = false;
        let mut host = Host::probed(id, 1, 8);
        assert_eq!(
            host.admin(config(DBS, EIS)).status(),
            Some(NvmeStatus::InvalidOpcode)
        );
    }

    #[test]
    fn configuring_sets_the_slots_of_existing_queues_and_new_ones_start_at_zero() {
        let mut host = Host::probed(identity(LbaSize::B4096), 2, 8);
        // Some traffic first, so that the values are not zero.
        for cid in 0..3 {
            host.io(1, read(cid));
        }
        host.write_mem(DBS, &[0xee; 4096]);
        host.write_mem(EIS, &[0xee; 4096]);
        assert_eq!(
            host.admin(config(DBS, EIS)).status(),
            Some(NvmeStatus::Success)
        );
        assert_eq!(u32_at(&host, DBS + sq_slot(1)), 3);
        assert_eq!(u32_at(&host, EIS + sq_slot(1)), 3, "the tail fetched");
        assert_eq!(u32_at(&host, DBS + cq_slot(1)), 3);
        assert_eq!(u32_at(&host, EIS + cq_slot(1)), 3, "the CQ's tail");
        assert_eq!(u32_at(&host, DBS + sq_slot(2)), 0);
        // The admin queue's slots are left alone.
        assert_eq!(u32_at(&host, DBS), 0xeeee_eeee);
        assert_eq!(u32_at(&host, EIS + 4), 0xeeee_eeee);
        // A queue created now starts at 0, whatever its slots held.
        for op in [admin_op::DELETE_SQ, admin_op::DELETE_CQ] {
            let c = host.admin(Sqe::new(op, 0).with_cdw(10, 2));
            assert_eq!(c.status(), Some(NvmeStatus::Success));
        }
        host.forget(2);
        host.write_mem(DBS + sq_slot(2), &[0xee; 8]);
        host.write_mem(EIS + sq_slot(2), &[0xee; 8]);
        host.create_pair(2, 8);
        for slot in [sq_slot(2), cq_slot(2)] {
            assert_eq!(u32_at(&host, DBS + slot), 0, "{slot:#x}");
            assert_eq!(u32_at(&host, EIS + slot), 0, "{slot:#x}");
        }
    }

    /// Each command rings while the controller is idle (the SQ EventIdx is
    /// the tail it fetched up to); the CQ head never rings (its EventIdx is
    /// the CQ's tail); everything completes in order, round the ring.
    #[test]
    fn a_linux_host_rings_only_when_the_event_index_says() {
        for threads in [false, true] {
            let what = format!("threads={threads}");
            let mut h = Shadowed::new(threads, 8);
            let before = h.host.ctrl.counters().mmio_doorbells.load(Relaxed);
            for cid in 0..20u16 {
                assert!(h.submit(read(cid)), "{what}: idle, so it asks; cid={cid}");
                assert_eq!(h.sq_event_idx(), u32::from(h.sq_tail), "{what}");
                let (got, rang) = h.reap();
                assert_eq!(got.len(), 1, "{what}");
                assert_eq!(
                    (got[0].cid, got[0].status()),
                    (cid, Some(NvmeStatus::Success))
                );
                assert!(!rang, "{what}: the CQ head does not ring");
                assert_eq!(h.cq_event_idx(), u32::from(h.cq_head), "{what}");
            }
            let counters = h.host.ctrl.counters();
            assert_eq!(
                counters.mmio_doorbells.load(Relaxed) - before,
                20,
                "{what}: SQ tails only"
            );
            // Twenty tails, and the head twice: when the queue looked full
            // by the head the controller knew (at cids 7 and 14).
            assert_eq!(counters.shadow_updates.load(Relaxed), 22, "{what}");
            assert_eq!(counters.sq_stalls.load(Relaxed), 0, "{what}");
            assert_eq!(h.host.handler.take().len(), 20, "{what}");
        }
    }

    /// Commands announced in the slot alone are fetched after one ring, and
    /// the ring's value does not matter: the slot's is newer.
    #[test]
    fn a_host_that_only_writes_the_shadow_buffer_is_served_after_one_ring() {
        for threads in [false, true] {
            let what = format!("threads={threads}");
            let mut h = Shadowed::new(threads, 16);
            for cid in 0..5 {
                h.host.place(1, read(cid));
            }
            h.host.write_mem(DBS + sq_slot(1), &5u32.to_le_bytes());
            h.host.settle();
            assert!(h.host.handler.take().is_empty(), "{what}: nobody rang");
            h.host.write32(DOORBELLS + sq_slot(1), 1);
            h.host.settle();
            assert_eq!(h.host.handler.take().len(), 5, "{what}");
            assert_eq!(h.sq_event_idx(), 5, "{what}");
            assert_eq!(h.take().len(), 5, "{what}");
            assert_eq!(h.host.csts() & csts::CFS, 0, "{what}");
        }
    }

    /// A host that consumed completions without ringing (the EventIdx did
    /// not ask) has made room: a queue that looks full reads the slot.
    #[test]
    fn the_head_is_read_from_the_slot_when_the_queue_looks_full() {
        for threads in [false, true] {
            let what = format!("threads={threads}");
            let mut h = Shadowed::new(threads, 8);
            for round in 0..3u16 {
                for cid in 0..7 {
                    h.submit(read(round * 7 + cid));
                }
                let (got, rang) = h.reap();
                assert_eq!(got.len(), 7, "{what} round {round}");
                assert!(!rang, "{what} round {round}");
            }
            assert_eq!(h.host.handler.take().len(), 21, "{what}");
            assert_eq!(h.host.ctrl.counters().sq_stalls.load(Relaxed), 0, "{what}");
        }
    }

    /// A host with more commands outstanding than its CQ holds: the SQ
    /// stops, and the CQ EventIdx goes to the head the controller knows, so
    /// the host's next head update rings; then back to the tail.
    #[test]
    fn a_queue_waiting_for_room_asks_for_the_head_doorbell() {
        for threads in [false, true] {
            let what = format!("threads={threads}");
            let mut h = Shadowed::new(threads, 8);
            h.host.handler.immediate.store(false, Relaxed);
            for cid in 0..7 {
                h.submit(read(cid));
            }
            for t in h.host.held() {
                h.host.ctrl.complete(t, NvmeStatus::Success, 0);
            }
            assert_eq!(h.cq_event_idx(), 7, "{what}: at the tail");
            h.submit(read(7));
            assert!(h.host.held().is_empty(), "{what}: no room");
            assert_eq!(h.host.ctrl.counters().sq_stalls.load(Relaxed), 1, "{what}");
            assert_eq!(h.cq_event_idx(), 0, "{what}: at the head");
            assert!(h.host.ctrl.lock().cq(1).unwrap().awaited, "{what}");
            let (got, rang) = h.reap();
            assert_eq!(got.len(), 7, "{what}");
            assert!(rang, "{what}: the EventIdx asked");
            assert_eq!(h.host.held().len(), 1, "{what}: the eighth is fetched");
            assert!(!h.host.ctrl.lock().cq(1).unwrap().awaited, "{what}");
            assert_eq!(h.cq_event_idx(), 7, "{what}: back at the tail");
        }
    }

    #[test]
    fn a_reset_forgets_the_buffers() {
        let mut h = Shadowed::new(false, 8);
        h.host.write32(reg::CC, 0);
        assert!(h.host.ctrl.lock().shadow.is_none());
        h.host.enable();
        h.host.create_pair(1, 8);
        assert!(h.host.ctrl.lock().sq(1).unwrap().shadow.is_none());
        // Registers again: the slot is not read.
        h.host.write_mem(DBS + sq_slot(1), &3u32.to_le_bytes());
        let c = h.host.io(1, read(1));
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        assert_eq!(h.host.handler.take().len(), 1);
        // A function-level reset too.
        let c = h.host.admin(config(DBS, EIS));
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        h.host.ctrl.reset();
        assert!(h.host.ctrl.lock().shadow.is_none());
    }

    #[test]
    fn a_shadow_value_past_the_queue_is_a_doorbell_error() {
        for (what, slot, value) in [
            ("SQ tail past the queue", sq_slot(1), 8u32),
            ("CQ head past the tail", cq_slot(1), 3),
        ] {
            let h = Shadowed::new(false, 8);
            h.host.write_mem(DBS + slot, &value.to_le_bytes());
            h.host.write32(DOORBELLS + slot, 0);
            assert_eq!(h.host.csts() & csts::CFS, csts::CFS, "{what}");
            let counters = h.host.ctrl.counters();
            assert_eq!(counters.doorbell_errors.load(Relaxed), 1, "{what}");
        }
    }
}
