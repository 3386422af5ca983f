//! NVMe completion statuses: the status code type (SCT), the status code (SC)
//! and Do Not Retry, as they go into a completion queue entry.

/// The status of a completed command (NVMe 1.4, 4.6.1.2).
///
/// Every variant but [`NvmeStatus::Success`] is an error; each knows its
/// status code type, its code and whether the host may retry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NvmeStatus {
    #[error("Successful completion")]
    Success,

    // Generic command status (SCT 0).
    #[error("Invalid command opcode")]
    InvalidOpcode,
    #[error("Invalid field in command")]
    InvalidField,
    #[error("Command ID conflict")]
    CommandIdConflict,
    #[error("Data transfer error")]
    DataTransferError,
    #[error("Internal error")]
    InternalError,
    #[error("Command abort requested")]
    AbortRequested,
    #[error("Command aborted due to SQ deletion")]
    AbortSqDeletion,
    #[error("Invalid namespace or format")]
    InvalidNamespace,
    #[error("Command sequence error")]
    CommandSequenceError,
    #[error("PRP offset invalid")]
    PrpOffsetInvalid,
    #[error("Namespace is write protected")]
    NamespaceWriteProtected,
    #[error("LBA out of range")]
    LbaOutOfRange,

    // Command specific status (SCT 1).
    #[error("Completion queue invalid")]
    CompletionQueueInvalid,
    #[error("Invalid queue identifier")]
    InvalidQueueIdentifier,
    #[error("Invalid queue size")]
    InvalidQueueSize,
    #[error("Abort command limit exceeded")]
    AbortLimitExceeded,
    #[error("Asynchronous event request limit exceeded")]
    AsyncEventLimitExceeded,
    #[error("Invalid interrupt vector")]
    InvalidInterruptVector,
    #[error("Invalid log page")]
    InvalidLogPage,
    #[error("Invalid format")]
    InvalidFormat,
    #[error("Invalid queue deletion")]
    InvalidQueueDeletion,
    #[error("Feature identifier not saveable")]
    FeatureNotSaveable,
    #[error("Feature not changeable")]
    FeatureNotChangeable,

    // Media and data integrity errors (SCT 2).
    #[error("Write fault")]
    WriteFault,
    #[error("Unrecovered read error")]
    UnrecoveredReadError,
}

/// Status code types.
const GENERIC: u8 = 0;
const COMMAND_SPECIFIC: u8 = 1;
const MEDIA: u8 = 2;

/// Do Not Retry: bit 14 of the status field.
const DNR: u16 = 1 << 14;

impl NvmeStatus {
    /// Every status, for tests and decoding.
    pub const ALL: [NvmeStatus; 26] = [
        NvmeStatus::Success,
        NvmeStatus::InvalidOpcode,
        NvmeStatus::InvalidField,
        NvmeStatus::CommandIdConflict,
        NvmeStatus::DataTransferError,
        NvmeStatus::InternalError,
        NvmeStatus::AbortRequested,
        NvmeStatus::AbortSqDeletion,
        NvmeStatus::InvalidNamespace,
        NvmeStatus::CommandSequenceError,
        NvmeStatus::PrpOffsetInvalid,
        NvmeStatus::NamespaceWriteProtected,
        NvmeStatus::LbaOutOfRange,
        NvmeStatus::CompletionQueueInvalid,
        NvmeStatus::InvalidQueueIdentifier,
        NvmeStatus::InvalidQueueSize,
        NvmeStatus::AbortLimitExceeded,
        NvmeStatus::AsyncEventLimitExceeded,
        NvmeStatus::InvalidInterruptVector,
        NvmeStatus::InvalidLogPage,
        NvmeStatus::InvalidFormat,
        NvmeStatus::InvalidQueueDeletion,
        NvmeStatus::FeatureNotSaveable,
        NvmeStatus::FeatureNotChangeable,
        NvmeStatus::WriteFault,
        NvmeStatus::UnrecoveredReadError,
    ];

    /// The status code type and status code.
    pub const fn code(self) -> (u8, u8) {
        use NvmeStatus::*;
        match self {
            Success => (GENERIC, 0x00),
            InvalidOpcode => (GENERIC, 0x01),
            InvalidField => (GENERIC, 0x02),
            CommandIdConflict => (GENERIC, 0x03),
            DataTransferError => (GENERIC, 0x04),
            InternalError => (GENERIC, 0x06),
            AbortRequested => (GENERIC, 0x07),
            AbortSqDeletion => (GENERIC, 0x08),
            InvalidNamespace => (GENERIC, 0x0b),
            CommandSequenceError => (GENERIC, 0x0c),
            PrpOffsetInvalid => (GENERIC, 0x13),
            NamespaceWriteProtected => (GENERIC, 0x20),
            LbaOutOfRange => (GENERIC, 0x80),
            CompletionQueueInvalid => (COMMAND_SPECIFIC, 0x00),
            InvalidQueueIdentifier => (COMMAND_SPECIFIC, 0x01),
            InvalidQueueSize => (COMMAND_SPECIFIC, 0x02),
            AbortLimitExceeded => (COMMAND_SPECIFIC, 0x03),
            AsyncEventLimitExceeded => (COMMAND_SPECIFIC, 0x05),
            InvalidInterruptVector => (COMMAND_SPECIFIC, 0x08),
            InvalidLogPage => (COMMAND_SPECIFIC, 0x09),
            InvalidFormat => (COMMAND_SPECIFIC, 0x0a),
            InvalidQueueDeletion => (COMMAND_SPECIFIC, 0x0c),
            FeatureNotSaveable => (COMMAND_SPECIFIC, 0x0d),
            FeatureNotChangeable => (COMMAND_SPECIFIC, 0x0e),
            WriteFault => (MEDIA, 0x80),
            UnrecoveredReadError => (MEDIA, 0x81),
        }
    }

    /// A short name for status reports and logs.
    pub const fn name(self) -> &'static str {
        use NvmeStatus::*;
        match self {
            Success => "success",
            InvalidOpcode => "invalid-opcode",
            InvalidField => "invalid-field",
            CommandIdConflict => "command-id-conflict",
            DataTransferError => "data-transfer-error",
            InternalError => "internal-error",
            AbortRequested => "abort-requested",
            AbortSqDeletion => "abort-sq-deletion",
            InvalidNamespace => "invalid-namespace",
            CommandSequenceError => "command-sequence-error",
            PrpOffsetInvalid => "prp-offset-invalid",
            NamespaceWriteProtected => "namespace-write-protected",
            LbaOutOfRange => "lba-out-of-range",
            CompletionQueueInvalid => "completion-queue-invalid",
            InvalidQueueIdentifier => "invalid-queue-identifier",
            InvalidQueueSize => "invalid-queue-size",
            AbortLimitExceeded => "abort-limit-exceeded",
            AsyncEventLimitExceeded => "async-event-limit-exceeded",
            InvalidInterruptVector => "invalid-interrupt-vector",
            InvalidLogPage => "invalid-log-page",
            InvalidFormat => "invalid-format",
            InvalidQueueDeletion => "invalid-queue-deletion",
            FeatureNotSaveable => "feature-not-saveable",
            FeatureNotChangeable => "feature-not-changeable",
            WriteFault => "write-fault",
            UnrecoveredReadError => "unrecovered-read-error",
        }
    }

    /// Where the status sits in [`NvmeStatus::ALL`].
    pub fn index(self) -> usize {
        NvmeStatus::ALL
            .iter()
            .position(|&s| s == self)
            .unwrap_or_default()
    }

    pub fn is_success(self) -> bool {
        self == NvmeStatus::Success
    }

    /// Whether the same command would fail the same way again. Linux retries a
    /// failed command up to five times unless DNR is set, so every status that
    /// names the command's own mistake, or a bad block that stays bad, sets it;
    /// only a transient internal error and the aborts leave the host free to
    /// retry.
    pub fn do_not_retry(self) -> bool {
        !matches!(
            self,
            NvmeStatus::Success
                | NvmeStatus::InternalError
                | NvmeStatus::AbortRequested
                | NvmeStatus::AbortSqDeletion
        )
    }

    /// The 15-bit status field (bits 31:17 of completion dword 3, shifted
    /// down by 17): SC in bits 7:0, SCT in 10:8, DNR in 14.
    pub fn field(self) -> u16 {
        let (sct, sc) = self.code();
        let dnr = if self.do_not_retry() { DNR } else { 0 };
        u16::from(sct) << 8 | u16::from(sc) | dnr
    }

    /// The status a status field names (CRD, More and DNR ignored), if it is
    /// one this controller uses.
    pub fn from_field(field: u16) -> Option<NvmeStatus> {
        let sct = u8::try_from((field >> 8) & 0x7).ok()?;
        let sc = u8::try_from(field & 0xff).ok()?;
        NvmeStatus::ALL.into_iter().find(|s| s.code() == (sct, sc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_specs() {
        // Values from the NVMe 1.4 base specification, figures 128-130, as
        // Linux's include/linux/nvme.h spells them (SCT << 8 | SC).
        let linux = [
            (NvmeStatus::InvalidOpcode, 0x001),
            (NvmeStatus::InvalidField, 0x002),
            (NvmeStatus::DataTransferError, 0x004),
            (NvmeStatus::InternalError, 0x006),
            (NvmeStatus::InvalidNamespace, 0x00b),
            (NvmeStatus::PrpOffsetInvalid, 0x013),
            (NvmeStatus::LbaOutOfRange, 0x080),
            (NvmeStatus::CompletionQueueInvalid, 0x100),
            (NvmeStatus::InvalidQueueIdentifier, 0x101),
            (NvmeStatus::InvalidQueueSize, 0x102),
            (NvmeStatus::InvalidInterruptVector, 0x108),
            (NvmeStatus::InvalidLogPage, 0x109),
            (NvmeStatus::InvalidFormat, 0x10a),
            (NvmeStatus::InvalidQueueDeletion, 0x10c),
            (NvmeStatus::WriteFault, 0x280),
            (NvmeStatus::UnrecoveredReadError, 0x281),
        ];
        for (status, code) in linux {
            assert_eq!(status.field() & 0x7ff, code, "{status}");
        }
    }

    #[test]
    fn dnr_on_the_guests_mistakes_not_on_transient_errors() {
        assert_eq!(NvmeStatus::Success.field(), 0);
        assert_eq!(NvmeStatus::InvalidField.field(), 0x4002);
        assert_eq!(NvmeStatus::UnrecoveredReadError.field(), 0x4281);
        assert_eq!(NvmeStatus::InternalError.field(), 0x0006);
        assert_eq!(NvmeStatus::AbortSqDeletion.field(), 0x0008);
    }

    #[test]
    fn every_status_has_its_own_name_and_place() {
        let names: std::collections::HashSet<_> =
            NvmeStatus::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), NvmeStatus::ALL.len());
        for (i, s) in NvmeStatus::ALL.into_iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn fields_decode_back() {
        for s in NvmeStatus::ALL {
            assert_eq!(NvmeStatus::from_field(s.field()), Some(s));
        }
        assert_eq!(NvmeStatus::from_field(0x0005), None);
        assert_eq!(NvmeStatus::from_field(0x0700), None);
    }
}
