//! The admin command set (NVMe 1.4, 5): I/O queue creation and deletion,
//! Identify, Get Log Page, Set / Get Features, Abort, Asynchronous Event
//! Request, and (NVMe 1.3) Doorbell Buffer Config, in `shadow`. Everything
//! runs under the controller's lock except a write cache change, which the
//! handler makes.

use dma::Gpa;
use log::debug;

use super::command::{admin_op, bits, high16, low16, Sqe, NSID_ALL};
use super::controller::{Controller, Disposition, Effects, MappedMemory, State};
use super::features::Features;
use super::handler::CommandTag;
use super::identify::{self, ASYNC_EVENT_LIMIT, NSID};
use super::prp::{self, PAGE};
use super::queue::{ring_in_memory, CompQueue, SubQueue};
use super::shadow::new_queue_slot;
use super::status::NvmeStatus;

/// The most bytes an admin command moves, whatever MDTS says: log pages are
/// small, and a host asking for more gets zeros beyond them.
const ADMIN_MAX_TRANSFER: u64 = 1 << 20;

/// Feature identifiers.
pub mod fid {
    pub const ARBITRATION: u32 = 0x01;
    pub const POWER_MANAGEMENT: u32 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u32 = 0x04;
    pub const VOLATILE_WRITE_CACHE: u32 = 0x06;
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
    pub const INTERRUPT_COALESCING: u32 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u32 = 0x09;
    pub const WRITE_ATOMICITY: u32 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u32 = 0x0b;
}

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u32 = 0x01;
    pub const SMART: u32 = 0x02;
    pub const FIRMWARE_SLOT: u32 = 0x03;
}

impl Controller {
    pub(super) fn admin(
        &self,
        st: &mut State,
        mem: &MappedMemory,
        sqe: &Sqe,
        tag: CommandTag,
        fx: &mut Effects,
    ) -> Disposition {
        if sqe.fuse() != 0 || sqe.psdt() != 0 {
            return NvmeStatus::InvalidField.into();
        }
        let outcome = match sqe.opcode() {
            admin_op::DELETE_SQ => self.delete_sq(st, sqe, tag),
            admin_op::CREATE_SQ => self.create_sq(st, mem, sqe),
            admin_op::GET_LOG_PAGE => self.get_log_page(mem, sqe),
            admin_op::DELETE_CQ => delete_cq(st, sqe),
            admin_op::CREATE_CQ => self.create_cq(st, mem, sqe),
            admin_op::IDENTIFY => self.identify(mem, sqe),
            // Abort: dword 0 bit 0 set, the command was not aborted.
            admin_op::ABORT => Disposition::Done(NvmeStatus::Success, 1),
            admin_op::SET_FEATURES => self.set_features(st, sqe, tag, fx),
            admin_op::GET_FEATURES => self.get_features(st, sqe),
            admin_op::ASYNC_EVENT_REQUEST => async_event_request(st, tag),
            admin_op::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(st, mem, sqe),
            _ => NvmeStatus::InvalidOpcode.into(),
        };
        if let Disposition::Done(status, _) = outcome {
            if !status.is_success() {
                debug!(
                    "nvme: admin op={:#04x} cid={} failed: {status}",
                    sqe.opcode(),
                    sqe.cid()
                );
            }
        }
        outcome
    }

    /// Create I/O Completion Queue.
    fn create_cq(&self, st: &mut State, mem: &MappedMemory, sqe: &Sqe) -> Disposition {
        let (dw10, dw11) = (sqe.cdw(10), sqe.cdw(11));
        let qid = low16(dw10);
        let contiguous = dw11 & 1 != 0;
        let interrupts = dw11 & 2 != 0;
        let vector = high16(dw11);
        let (_, granted) = st.features.granted();
        if qid == 0 || qid > granted || st.cq(qid).is_some() {
            return NvmeStatus::InvalidQueueIdentifier.into();
        }
        let Some(entries) = self.queue_entries(dw10) else {
            return NvmeStatus::InvalidQueueSize.into();
        };
        if !contiguous {
            return NvmeStatus::InvalidField.into();
        }
        if interrupts && vector >= self.identity.vectors {
            return NvmeStatus::InvalidInterruptVector.into();
        }
        if bits(st.cc, 20, 23) != 4 {
            return NvmeStatus::InvalidField.into();
        }
        let base = Gpa(sqe.prp1());
        if !base.0.is_multiple_of(PAGE) || !ring_in_memory(mem, base, entries, 16) {
            return NvmeStatus::InvalidField.into();
        }
        let mut cq = CompQueue::new(qid, base, entries, interrupts.then_some(vector));
        match new_queue_slot(st.shadow.and_then(|b| b.cq(qid)), mem) {
            Ok(slot) => cq.shadow = slot,
            Err(_) => return NvmeStatus::InvalidField.into(),
        }
        st.cqs[usize::from(qid)] = Some(cq);
        debug!("nvme: q={qid} completion queue of {entries} at {base}, vector {vector}");
        NvmeStatus::Success.into()
    }

    /// Create I/O Submission Queue.
    fn create_sq(&self, st: &mut State, mem: &MappedMemory, sqe: &Sqe) -> Disposition {
        let (dw10, dw11) = (sqe.cdw(10), sqe.cdw(11));
        let qid = low16(dw10);
        let contiguous = dw11 & 1 != 0;
        let cqid = high16(dw11);
        let (granted, _) = st.features.granted();
        if qid == 0 || qid > granted || st.sq(qid).is_some() {
            return NvmeStatus::InvalidQueueIdentifier.into();
        }
        let Some(entries) = self.queue_entries(dw10) else {
            return NvmeStatus::InvalidQueueSize.into();
        };
        if !contiguous {
            return NvmeStatus::InvalidField.into();
        }
        if cqid == 0 || st.cq(cqid).is_none() {
            return NvmeStatus::CompletionQueueInvalid.into();
        }
        if bits(st.cc, 16, 19) != 6 {
            return NvmeStatus::InvalidField.into();
        }
        let base = Gpa(sqe.prp1());
        if !base.0.is_multiple_of(PAGE) || !ring_in_memory(mem, base, entries, Sqe::SIZE) {
            return NvmeStatus::InvalidField.into();
        }
        let Ok(slot) = new_queue_slot(st.shadow.and_then(|b| b.sq(qid)), mem) else {
            return NvmeStatus::InvalidField.into();
        };
        let incarnation = self.next_incarnation(st);
        let mut sq = SubQueue::new(qid, base, entries, cqid, incarnation);
        sq.shadow = slot;
        st.sqs[usize::from(qid)] = Some(sq);
        if let Some(cq) = st.cq_mut(cqid) {
            cq.sqs += 1;
        }
        debug!("nvme: q={qid} submission queue of {entries} at {base}, completing to {cqid}");
        NvmeStatus::Success.into()
    }

    /// QSIZE (zero-based, bits 31:16 of dword 10) as a count, if the
    /// controller takes it.
    fn queue_entries(&self, dw10: u32) -> Option<u16> {
        let entries = u32::from(high16(dw10)) + 1;
        u16::try_from(entries)
            .ok()
            .filter(|&n| n >= 2 && n <= self.identity.queue_entries)
    }

    /// Delete I/O Submission Queue: at once, or when its last command in
    /// flight completes.
    fn delete_sq(&self, st: &mut State, sqe: &Sqe, tag: CommandTag) -> Disposition {
        let qid = low16(sqe.cdw(10));
        let Some(sq) = st
            .sq_mut(qid)
            .filter(|sq| qid != 0 && sq.deleting.is_none())
        else {
            return NvmeStatus::InvalidQueueIdentifier.into();
        };
        if sq.in_flight.is_empty() {
            self.remove_sq(st, qid);
            debug!("nvme: q={qid} submission queue deleted");
            NvmeStatus::Success.into()
        } else {
            debug!(
                "nvme: q={qid} submission queue deleted when its {} commands complete",
                sq.in_flight.len()
            );
            sq.deleting = Some(tag);
            Disposition::Held
        }
    }

    /// Identify: CNS 00h namespace, 01h controller, 02h active namespace
    /// list, 03h namespace identification descriptors, 06h NVM controller.
    fn identify(&self, mem: &MappedMemory, sqe: &Sqe) -> Disposition {
        let cns = bits(sqe.cdw(10), 0, 7);
        let csi = bits(sqe.cdw(11), 24, 31);
        let nsid = sqe.nsid();
        let id = &self.identity;
        let data = match cns {
            0x00 if nsid == NSID => id.namespace(),
            0x01 => id.controller(),
            0x02 if nsid < NSID_ALL - 1 => id.active_namespaces(nsid),
            0x03 if nsid == NSID => id.descriptors(),
            0x00 | 0x02 | 0x03 => return NvmeStatus::InvalidNamespace.into(),
            0x06 if csi == 0 => id.nvm_controller(),
            _ => return NvmeStatus::InvalidField.into(),
        };
        self.write_data(mem, sqe, &data)
    }

    /// Get Log Page: error information, SMART / health, firmware slot.
    fn get_log_page(&self, mem: &MappedMemory, sqe: &Sqe) -> Disposition {
        let (dw10, dw11) = (sqe.cdw(10), sqe.cdw(11));
        let log_id = bits(dw10, 0, 7);
        let dwords = u64::from(bits(dw10, 16, 31) | bits(dw11, 0, 15) << 16) + 1;
        let offset = u64::from(sqe.cdw(12)) | u64::from(sqe.cdw(13)) << 32;
        let log = match log_id {
            lid::ERROR => identify::error_log(),
            lid::SMART if [0, NSID, NSID_ALL].contains(&sqe.nsid()) => {
                identify::smart_log(self.health(), self.identity.lbs)
            }
            lid::SMART => return NvmeStatus::InvalidNamespace.into(),
            lid::FIRMWARE_SLOT => self.identity.firmware_log(),
            _ => return NvmeStatus::InvalidLogPage.into(),
        };
        let len = dwords * 4;
        let Ok(start) = usize::try_from(offset) else {
            return NvmeStatus::InvalidField.into();
        };
        if !offset.is_multiple_of(4) || start > log.len() || len > ADMIN_MAX_TRANSFER {
            return NvmeStatus::InvalidField.into();
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or_default()];
        let part = &log[start..];
        let n = part.len().min(data.len());
        data[..n].copy_from_slice(&part[..n]);
        self.write_data(mem, sqe, &data)
    }

    fn set_features(
        &self,
        st: &mut State,
        sqe: &Sqe,
        tag: CommandTag,
        fx: &mut Effects,
    ) -> Disposition {
        let (dw10, value) = (sqe.cdw(10), sqe.cdw(11));
        if dw10 >> 31 != 0 {
            return NvmeStatus::FeatureNotSaveable.into();
        }
        let f = &mut st.features;
        match bits(dw10, 0, 7) {
            fid::ARBITRATION => f.arbitration = value,
            // Power state 0 is the only one.
            fid::POWER_MANAGEMENT if bits(value, 0, 4) == 0 => f.power_management = value & 0xff,
            fid::TEMPERATURE_THRESHOLD => match temperature_threshold(value) {
                Some(i) => f.temperature[i] = low16(value),
                None => return NvmeStatus::InvalidField.into(),
            },
            fid::VOLATILE_WRITE_CACHE if self.identity.write_cache.is_some() => {
                fx.write_cache.push((tag, value & 1 != 0));
                return Disposition::Held;
            }
            fid::NUMBER_OF_QUEUES => return self.set_queue_count(st, value),
            fid::INTERRUPT_COALESCING => f.interrupt_coalescing = value & 0xffff,
            fid::INTERRUPT_VECTOR_CONFIG if low16(value) < self.identity.vectors => {}
            fid::WRITE_ATOMICITY => f.write_atomicity = value & 1,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config = value,
            _ => return NvmeStatus::InvalidField.into(),
        }
        NvmeStatus::Success.into()
    }

    /// Number of Queues: grants what was asked for up to the limit; only
    /// before any I/O queue exists.
    fn set_queue_count(&self, st: &mut State, value: u32) -> Disposition {
        let (sqs, cqs) = (low16(value), high16(value));
        if sqs == u16::MAX || cqs == u16::MAX {
            return NvmeStatus::InvalidField.into();
        }
        if st.io_queues_exist() {
            return NvmeStatus::CommandSequenceError.into();
        }
        let most = self.identity.io_queues.max(1) - 1;
        let granted = u32::from(sqs.min(most)) | u32::from(cqs.min(most)) << 16;
        st.features.queues = granted;
        Disposition::Done(NvmeStatus::Success, granted)
    }

    fn get_features(&self, st: &State, sqe: &Sqe) -> Disposition {
        let (dw10, dw11) = (sqe.cdw(10), sqe.cdw(11));
        let feature = bits(dw10, 0, 7);
        let defaults;
        let f = match bits(dw10, 8, 10) {
            0 => &st.features,
            // Default and saved: nothing is saveable, so both are the defaults.
            1 | 2 => {
                defaults = Features::defaults(&self.identity);
                &defaults
            }
            3 => {
                // Supported capabilities: changeable (bit 2), never saveable
                // or namespace specific.
                return if self.feature_exists(feature) {
                    Disposition::Done(NvmeStatus::Success, 1 << 2)
                } else {
                    NvmeStatus::InvalidField.into()
                };
            }
            _ => return NvmeStatus::InvalidField.into(),
        };
        let value = match feature {
            fid::ARBITRATION => f.arbitration,
            fid::POWER_MANAGEMENT => f.power_management,
            fid::TEMPERATURE_THRESHOLD => match temperature_threshold(dw11) {
                Some(i) => u32::from(f.temperature[i]),
                None => return NvmeStatus::InvalidField.into(),
            },
            fid::VOLATILE_WRITE_CACHE if self.identity.write_cache.is_some() => {
                u32::from(f.write_cache)
            }
            fid::NUMBER_OF_QUEUES => f.queues,
            fid::INTERRUPT_COALESCING => f.interrupt_coalescing,
            // The vector, with coalescing never disabled.
            fid::INTERRUPT_VECTOR_CONFIG if low16(dw11) < self.identity.vectors => dw11 & 0xffff,
            fid::WRITE_ATOMICITY => f.write_atomicity,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config,
            _ => return NvmeStatus::InvalidField.into(),
        };
        Disposition::Done(NvmeStatus::Success, value)
    }

    fn feature_exists(&self, feature: u32) -> bool {
        match feature {
            fid::VOLATILE_WRITE_CACHE => self.identity.write_cache.is_some(),
            fid::ARBITRATION
            | fid::POWER_MANAGEMENT
            | fid::TEMPERATURE_THRESHOLD
            | fid::NUMBER_OF_QUEUES
            | fid::INTERRUPT_COALESCING
            | fid::INTERRUPT_VECTOR_CONFIG
            | fid::WRITE_ATOMICITY
            | fid::ASYNC_EVENT_CONFIG => true,
            _ => false,
        }
    }

    /// Writes an admin command's data to the guest through its PRPs.
    fn write_data(&self, mem: &MappedMemory, sqe: &Sqe, data: &[u8]) -> Disposition {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let max = ADMIN_MAX_TRANSFER.min(self.max_transfer);
        let segments = match prp::segments(mem, sqe.prp1(), sqe.prp2(), len, max) {
            Ok(segments) => segments,
            Err(e) => {
                self.guest_error(format_args!(
                    "q=0 cid={} op={:#04x}: {e}",
                    sqe.cid(),
                    sqe.opcode()
                ));
                return e.status().into();
            }
        };
        match dma::to_guest(mem, &segments, data) {
            Ok(()) => NvmeStatus::Success.into(),
            Err(_) => NvmeStatus::DataTransferError.into(),
        }
    }
}

/// Delete I/O Completion Queue: only once no submission queue uses it.
fn delete_cq(st: &mut State, sqe: &Sqe) -> Disposition {
    let qid = low16(sqe.cdw(10));
    match st.cq(qid) {
        Some(_) if qid == 0 => NvmeStatus::InvalidQueueIdentifier.into(),
        None => NvmeStatus::InvalidQueueIdentifier.into(),
        Some(cq) if cq.sqs > 0 => NvmeStatus::InvalidQueueDeletion.into(),
        Some(_) => {
            st.cqs[usize::from(qid)] = None;
            debug!("nvme: q={qid} completion queue deleted");
            NvmeStatus::Success.into()
        }
    }
}

/// Asynchronous Event Request: held until the controller resets (no event
/// is ever reported), up to the limit.
fn async_event_request(st: &mut State, tag: CommandTag) -> Disposition {
    if st.async_events.len() > usize::from(ASYNC_EVENT_LIMIT) {
        return NvmeStatus::AsyncEventLimitExceeded.into();
    }
    st.async_events.push(tag);
    Disposition::Held
}

/// Which threshold a Temperature Threshold command names (0 over, 1 under):
/// the composite temperature (TMPSEL 0, or 0Fh for every sensor) only.
fn temperature_threshold(dw11: u32) -> Option<usize> {
    let sensor = bits(dw11, 16, 19);
    let which = bits(dw11, 20, 21);
    match (sensor, which) {
        (0 | 0xf, 0) => Some(0),
        (0 | 0xf, 1) => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use nvme_model::LbaSize;

    use super::*;
    use crate::nvme::command::io_op;
    use crate::nvme::controller::{cc, reg};
    use crate::nvme::test_utils::*;

    fn create_cq(qid: u16, entries: u32, flags: u32, vector: u16) -> Sqe {
        Sqe::new(admin_op::CREATE_CQ, 0)
            .with_prps(cq_base(qid), 0)
            .with_cdw(10, (entries - 1) << 16 | u32::from(qid))
            .with_cdw(11, u32::from(vector) << 16 | flags)
    }

    fn create_sq(qid: u16, entries: u32, flags: u32, cqid: u16) -> Sqe {
        Sqe::new(admin_op::CREATE_SQ, 0)
            .with_prps(sq_base(qid), 0)
            .with_cdw(10, (entries - 1) << 16 | u32::from(qid))
            .with_cdw(11, u32::from(cqid) << 16 | flags)
    }

    fn features(op: u8, fid: u32, dw11: u32) -> Sqe {
        Sqe::new(op, 0).with_cdw(10, fid).with_cdw(11, dw11)
    }

    fn log_page(lid: u32, dwords: u32, offset: u64) -> Sqe {
        Sqe::new(admin_op::GET_LOG_PAGE, 0)
            .with_nsid(NSID_ALL)
            .with_prps(ADMIN_BUF, 0)
            .with_cdw(10, lid | (dwords - 1) << 16)
            .with_cdw(12, offset as u32)
            .with_cdw(13, (offset >> 32) as u32)
    }

    fn status(host: &mut Host, sqe: Sqe) -> NvmeStatus {
        host.admin(sqe)
            .status()
            .expect("a status the controller knows")
    }

    #[test]
    fn queue_creation_checks_everything_the_spec_names() {
        let mut host = Host::probed(identity(LbaSize::B4096), 2, 8);
        let cases = [
            (create_cq(0, 8, 3, 0), NvmeStatus::InvalidQueueIdentifier),
            (create_cq(1, 8, 3, 1), NvmeStatus::InvalidQueueIdentifier),
            (create_cq(3, 8, 3, 3), NvmeStatus::InvalidQueueIdentifier),
            (create_sq(3, 8, 1, 1), NvmeStatus::InvalidQueueIdentifier),
            (create_sq(1, 8, 1, 1), NvmeStatus::InvalidQueueIdentifier),
        ];
        for (sqe, want) in cases {
            assert_eq!(status(&mut host, sqe), want, "{sqe:?}");
        }
        // Queue 2 again, after deleting it.
        for op in [admin_op::DELETE_SQ, admin_op::DELETE_CQ] {
            assert_eq!(
                status(&mut host, Sqe::new(op, 0).with_cdw(10, 2)),
                NvmeStatus::Success
            );
        }
        let cases = [
            (create_cq(2, 1, 3, 2), NvmeStatus::InvalidQueueSize),
            (create_cq(2, 65, 3, 2), NvmeStatus::InvalidQueueSize),
            (create_cq(2, 8, 2, 2), NvmeStatus::InvalidField),
            (create_cq(2, 8, 3, 5), NvmeStatus::InvalidInterruptVector),
            (
                create_cq(2, 8, 3, 2).with_prps(cq_base(2) + 16, 0),
                NvmeStatus::InvalidField,
            ),
            (
                create_cq(2, 8, 3, 2).with_prps(MEM_SIZE as u64, 0),
                NvmeStatus::InvalidField,
            ),
            (create_sq(2, 8, 1, 2), NvmeStatus::CompletionQueueInvalid),
            (create_sq(2, 8, 1, 0), NvmeStatus::CompletionQueueInvalid),
        ];
        for (sqe, want) in cases {
            assert_eq!(status(&mut host, sqe), want, "{sqe:?}");
        }
        // A vector past the table is fine on a polled queue.
        assert_eq!(
            status(&mut host, create_cq(2, 8, 1, 9)),
            NvmeStatus::Success
        );
        let cases = [
            (create_sq(2, 8, 0, 2), NvmeStatus::InvalidField),
            (create_sq(2, 0x1_0000, 1, 2), NvmeStatus::InvalidQueueSize),
            (
                create_sq(2, 8, 1, 2).with_prps(1 << 40, 0),
                NvmeStatus::InvalidField,
            ),
        ];
        for (sqe, want) in cases {
            assert_eq!(status(&mut host, sqe), want, "{sqe:?}");
        }
        assert_eq!(
            status(&mut host, create_sq(2, 8, 1, 2)),
            NvmeStatus::Success
        );
        assert!(host.admin(create_sq(2, 8, 1, 2)).dnr());
    }

    #[test]
    fn io_queues_need_the_entry_sizes_in_cc() {
        // CC.IOSQES / IOCQES left at 0, as an admin-only host does.
        let mut host = Host::new(identity(LbaSize::B4096));
        host.enable_admin_only();
        assert_eq!(host.read32(reg::CC), cc::EN);
        assert_eq!(
            status(&mut host, create_cq(1, 8, 3, 1)),
            NvmeStatus::InvalidField
        );
    }

    #[test]
    fn queue_deletion_errors() {
        let mut host = Host::probed(identity(LbaSize::B4096), 2, 8);
        let delete = |op, qid| Sqe::new(op, 0).with_cdw(10, qid);
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_SQ, 0)),
            NvmeStatus::InvalidQueueIdentifier
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_CQ, 0)),
            NvmeStatus::InvalidQueueIdentifier
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_SQ, 3)),
            NvmeStatus::InvalidQueueIdentifier
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_SQ, 0xffff)),
            NvmeStatus::InvalidQueueIdentifier
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_CQ, 1)),
            NvmeStatus::InvalidQueueDeletion
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_SQ, 1)),
            NvmeStatus::Success
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_SQ, 1)),
            NvmeStatus::InvalidQueueIdentifier
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_CQ, 1)),
            NvmeStatus::Success
        );
        // A submission queue can share a completion queue.
        assert_eq!(
            status(&mut host, create_sq(1, 8, 1, 2)),
            NvmeStatus::Success
        );
        assert_eq!(
            status(&mut host, delete(admin_op::DELETE_CQ, 2)),
            NvmeStatus::InvalidQueueDeletion
        );
    }

    #[test]
    fn identify_namespaces_and_unknown_cns() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        let identify = |cns: u32, nsid: u32| {
            Sqe::new(admin_op::IDENTIFY, 0)
                .with_nsid(nsid)
                .with_prps(ADMIN_BUF, 0)
                .with_cdw(10, cns)
        };
        for (cns, nsid) in [
            (0, 0),
            (0, 2),
            (0, NSID_ALL),
            (3, 0),
            (3, 2),
            (2, NSID_ALL - 1),
        ] {
            assert_eq!(
                status(&mut host, identify(cns, nsid)),
                NvmeStatus::InvalidNamespace,
                "cns {cns} nsid {nsid:#x}"
            );
        }
        host.write_mem(ADMIN_BUF, &[0xff; 8]);
        assert_eq!(status(&mut host, identify(2, 1)), NvmeStatus::Success);
        assert_eq!(host.read_mem(ADMIN_BUF, 8), vec![0; 8], "nothing above 1");
        for cns in [0x04, 0x05, 0x07, 0x10, 0xff] {
            assert_eq!(
                status(&mut host, identify(cns, 1)),
                NvmeStatus::InvalidField
            );
        }
        let zns = identify(6, 0).with_cdw(11, 2 << 24);
        assert_eq!(status(&mut host, zns), NvmeStatus::InvalidField);
    }

    #[test]
    fn identify_data_goes_through_the_prps() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        // PRP1 halfway into a page: the second half lands at PRP2.
        let c = host.admin(
            Sqe::new(admin_op::IDENTIFY, 0)
                .with_prps(ADMIN_BUF + 0x800, DATA)
                .with_cdw(10, 1),
        );
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        let whole = host.ctrl.identity().controller();
        assert_eq!(host.read_mem(ADMIN_BUF + 0x800, 0x800), whole[..0x800]);
        assert_eq!(host.read_mem(DATA, 0x800), whole[0x800..]);
        let bad = Sqe::new(admin_op::IDENTIFY, 0)
            .with_prps(ADMIN_BUF + 0x800, DATA + 8)
            .with_cdw(10, 1);
        assert_eq!(status(&mut host, bad), NvmeStatus::PrpOffsetInvalid);
        let outside = Sqe::new(admin_op::IDENTIFY, 0)
            .with_prps(1 << 40, 0)
            .with_cdw(10, 1);
        assert_eq!(status(&mut host, outside), NvmeStatus::DataTransferError);
    }

    #[test]
    fn number_of_queues() {
        let mut host = Host::new(identity(LbaSize::B4096));
        host.enable();
        let get = features(admin_op::GET_FEATURES, fid::NUMBER_OF_QUEUES, 0);
        assert_eq!(host.admin(get).dw0, 3 | 3 << 16, "the most by default");
        let set = |sqs: u32, cqs: u32| features(admin_op::SET_FEATURES, 7, sqs | cqs << 16);
        assert_eq!(status(&mut host, set(0xffff, 0)), NvmeStatus::InvalidField);
        let c = host.admin(set(0, 1));
        assert_eq!((c.status(), c.dw0), (Some(NvmeStatus::Success), 1 << 16));
        assert_eq!(host.admin(get).dw0, 1 << 16);
        host.create_pair(1, 8);
        assert_eq!(
            status(&mut host, set(2, 2)),
            NvmeStatus::CommandSequenceError
        );
        // One submission queue granted: a second is refused, a second CQ is not.
        assert_eq!(
            status(&mut host, create_cq(2, 8, 3, 2)),
            NvmeStatus::Success
        );
        assert_eq!(
            status(&mut host, create_sq(2, 8, 1, 2)),
            NvmeStatus::InvalidQueueIdentifier
        );
        // A reset restores the default.
        host.enable();
        assert_eq!(host.admin(get).dw0, 3 | 3 << 16);
    }

    #[test]
    fn volatile_write_cache_goes_to_the_handler() {
        let mut host = Host::probed(identity(LbaSize::B4096), 1, 8);
        let get = features(admin_op::GET_FEATURES, fid::VOLATILE_WRITE_CACHE, 0);
        assert_eq!(host.admin(get).dw0, 1);
        let off = features(admin_op::SET_FEATURES, fid::VOLATILE_WRITE_CACHE, 0);
        assert_eq!(status(&mut host, off), NvmeStatus::Success);
        assert_eq!(*host.handler.write_cache.lock().unwrap(), vec![false]);
        assert_eq!(host.admin(get).dw0, 0);
        assert!(!host.ctrl.write_cache_enabled());
        host.handler.refuse_write_cache.store(true, Relaxed);
        let on = features(admin_op::SET_FEATURES, fid::VOLATILE_WRITE_CACHE, 1);
        assert_eq!(status(&mut host, on), NvmeStatus::InternalError);
        assert_eq!(host.admin(get).dw0, 0, "unchanged when the handler refuses");
        // The default is what the identity says.
        let default = features(
            admin_op::GET_FEATURES,
            fid::VOLATILE_WRITE_CACHE | 1 << 8,
            0,
        );
        assert_eq!(host.admin(default).dw0, 1);

        let mut id = identity(LbaSize::B4096);
        id.write_cache = None;
        let mut host = Host::probed(id, 1, 8);
        assert_eq!(status(&mut host, get), NvmeStatus::InvalidField);
        assert_eq!(status(&mut host, off), NvmeStatus::InvalidField);
        assert!(host.handler.write_cache.lock().unwrap().is_empty());
    }

    #[test]
    fn other_features() {
        let mut host = Host::probed(identity(LbaSize::B4096), 1, 8);
        let set = |fid, v| features(admin_op::SET_FEATURES, fid, v);
        let get = |fid, v| features(admin_op::GET_FEATURES, fid, v);
        for fid in [
            fid::ARBITRATION,
            fid::INTERRUPT_COALESCING,
            fid::ASYNC_EVENT_CONFIG,
        ] {
            assert_eq!(status(&mut host, set(fid, 0x0203)), NvmeStatus::Success);
            assert_eq!(host.admin(get(fid, 0)).dw0, 0x0203);
        }
        assert_eq!(
            status(&mut host, set(fid::POWER_MANAGEMENT, 1)),
            NvmeStatus::InvalidField
        );
        assert_eq!(
            status(&mut host, set(fid::POWER_MANAGEMENT, 0x20)),
            NvmeStatus::Success
        );
        // Temperature thresholds of the composite sensor, over and under.
        assert_eq!(host.admin(get(fid::TEMPERATURE_THRESHOLD, 0)).dw0, 343);
        assert_eq!(
            status(&mut host, set(fid::TEMPERATURE_THRESHOLD, 1 << 20 | 250)),
            NvmeStatus::Success
        );
        assert_eq!(
            host.admin(get(fid::TEMPERATURE_THRESHOLD, 1 << 20)).dw0,
            250
        );
        assert_eq!(
            status(&mut host, get(fid::TEMPERATURE_THRESHOLD, 1 << 16)),
            NvmeStatus::InvalidField
        );
        assert_eq!(
            status(&mut host, set(fid::TEMPERATURE_THRESHOLD, 2 << 20)),
            NvmeStatus::InvalidField
        );
        assert_eq!(host.admin(get(fid::INTERRUPT_VECTOR_CONFIG, 4)).dw0, 4);
        assert_eq!(
            status(&mut host, get(fid::INTERRUPT_VECTOR_CONFIG, 5)),
            NvmeStatus::InvalidField
        );
        // Unknown features, saving, and selecting.
        for fid in [0x03, 0x05, 0x0c, 0x0d, 0x80, 0xff] {
            assert_eq!(status(&mut host, set(fid, 0)), NvmeStatus::InvalidField);
            assert_eq!(status(&mut host, get(fid, 0)), NvmeStatus::InvalidField);
        }
        assert_eq!(
            status(&mut host, set(fid::ARBITRATION | 1 << 31, 0)),
            NvmeStatus::FeatureNotSaveable
        );
        let caps = host.admin(get(fid::ARBITRATION | 3 << 8, 0));
        assert_eq!(
            (caps.status(), caps.dw0),
            (Some(NvmeStatus::Success), 0b100)
        );
        assert_eq!(
            status(&mut host, get(0x05 | 3 << 8, 0)),
            NvmeStatus::InvalidField
        );
        assert_eq!(
            host.admin(get(fid::ARBITRATION | 2 << 8, 0)).dw0,
            0,
            "saved: default"
        );
        assert_eq!(
            status(&mut host, get(fid::ARBITRATION | 4 << 8, 0)),
            NvmeStatus::InvalidField
        );
    }

    #[test]
    fn log_pages() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        for _ in 0..3 {
            let read = Sqe::new(io_op::READ, 1)
                .with_nsid(1)
                .with_prps(DATA, 0)
                .with_cdw(12, 7);
            host.io(1, read);
        }
        assert_eq!(
            status(&mut host, log_page(lid::SMART, 128, 0)),
            NvmeStatus::Success
        );
        let smart = host.read_mem(ADMIN_BUF, 512);
        assert_eq!(smart[64], 3, "host read commands");
        assert_eq!(smart[32], 1, "data units read, rounded up");
        // The firmware log from an offset; past its end, zeros.
        host.write_mem(ADMIN_BUF, &[0xff; 4096]);
        assert_eq!(
            status(&mut host, log_page(lid::FIRMWARE_SLOT, 1024, 8)),
            NvmeStatus::Success
        );
        let fw = host.read_mem(ADMIN_BUF, 4096);
        assert_eq!(&fw[..5], env!("CARGO_PKG_VERSION").as_bytes());
        assert!(fw[504..].iter().all(|&b| b == 0));
        assert_eq!(
            status(&mut host, log_page(lid::ERROR, 16, 0)),
            NvmeStatus::Success
        );
        let errors = [
            (log_page(0x04, 16, 0), NvmeStatus::InvalidLogPage),
            (log_page(0xc0, 16, 0), NvmeStatus::InvalidLogPage),
            (log_page(lid::SMART, 16, 2), NvmeStatus::InvalidField),
            (log_page(lid::SMART, 16, 516), NvmeStatus::InvalidField),
            (log_page(lid::SMART, 16, 1 << 40), NvmeStatus::InvalidField),
            (
                log_page(lid::SMART, 16, 0).with_nsid(2),
                NvmeStatus::InvalidNamespace,
            ),
            (
                log_page(lid::SMART, 16, 0).with_cdw(11, 0xffff),
                NvmeStatus::InvalidField,
            ),
        ];
        for (sqe, want) in errors {
            assert_eq!(status(&mut host, sqe), want, "{sqe:?}");
        }
    }

    #[test]
    fn abort_never_aborts_and_events_wait_up_to_the_limit() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        let c = host.admin(Sqe::new(admin_op::ABORT, 0).with_cdw(10, 1 | 5 << 16));
        assert_eq!((c.status(), c.dw0), (Some(NvmeStatus::Success), 1));
        for _ in 0..=ASYNC_EVENT_LIMIT {
            let cid = host.cid();
            host.submit(0, Sqe::new(admin_op::ASYNC_EVENT_REQUEST, cid));
            assert!(host.reap(0).is_empty());
        }
        let c = host.admin(Sqe::new(admin_op::ASYNC_EVENT_REQUEST, 0));
        assert_eq!(c.status(), Some(NvmeStatus::AsyncEventLimitExceeded));
    }

    #[test]
    fn unknown_opcodes_fused_and_sgl_commands() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        for op in [0x03, 0x0d, 0x10, 0x18, 0x7d, 0x80, 0xc0, 0xff] {
            let c = host.admin(Sqe::new(op, 0));
            assert_eq!(
                c.status(),
                Some(NvmeStatus::InvalidOpcode),
                "opcode {op:#x}"
            );
            assert!(c.dnr());
        }
        let fused = Sqe::new(admin_op::IDENTIFY, 0)
            .with_cdw(10, 1)
            .with_flags(1);
        assert_eq!(status(&mut host, fused), NvmeStatus::InvalidField);
        let sgl = Sqe::new(admin_op::IDENTIFY, 0)
            .with_cdw(10, 1)
            .with_flags(0x40);
        assert_eq!(status(&mut host, sgl), NvmeStatus::InvalidField);
    }

    #[test]
    fn a_command_identifier_in_flight_conflicts() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 8);
        host.submit(0, Sqe::new(admin_op::ASYNC_EVENT_REQUEST, 77));
        assert!(host.reap(0).is_empty());
        host.submit(0, Sqe::new(admin_op::IDENTIFY, 77).with_cdw(10, 1));
        let c = host.reap(0);
        assert_eq!(
            (c[0].cid, c[0].status()),
            (77, Some(NvmeStatus::CommandIdConflict))
        );
    }
}
