//! Findings: what the device saw the guest get wrong, with the evidence.

use serde::Serialize;

use crate::request::{Op, ReqId};
use crate::segment::Gpa;

/// What was seen. The names are the ones DESIGN.md and reports use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A canary in a read's destination was overwritten before the DMA.
    BufferReusedDuringDma,
    /// A write's source changed between arrival and DMA.
    SourceChangedDuringDma,
    /// A read's destination is the zero page.
    DmaToZeroPage,
    /// A write sourced from the zero page carried non-zero bytes.
    ZeroPageCorrupted,
    /// Two requests in flight target the same guest page, one writing memory.
    OverlappingInFlightDma,
    /// Data the device wrote was replaced by zeros or free-poison soon after completion.
    DataVanishedAfterCompletion,
    /// A write was sourced from the zero page (expected for untouched buffers).
    ZeroPageSource,
    /// All-zero write sources keep coming from one page: likely a zero buffer.
    SuspectedZeroBuffer,
}

impl FindingKind {
    pub const ALL: [FindingKind; 8] = [
        FindingKind::BufferReusedDuringDma,
        FindingKind::SourceChangedDuringDma,
        FindingKind::DmaToZeroPage,
        FindingKind::ZeroPageCorrupted,
        FindingKind::OverlappingInFlightDma,
        FindingKind::DataVanishedAfterCompletion,
        FindingKind::ZeroPageSource,
        FindingKind::SuspectedZeroBuffer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FindingKind::BufferReusedDuringDma => "buffer-reused-during-dma",
            FindingKind::SourceChangedDuringDma => "source-changed-during-dma",
            FindingKind::DmaToZeroPage => "dma-to-zero-page",
            FindingKind::ZeroPageCorrupted => "zero-page-corrupted",
            FindingKind::OverlappingInFlightDma => "overlapping-in-flight-dma",
            FindingKind::DataVanishedAfterCompletion => "data-vanished-after-completion",
            FindingKind::ZeroPageSource => "zero-page-source",
            FindingKind::SuspectedZeroBuffer => "suspected-zero-buffer",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Informational findings describe expected kernel behaviour, not a bug.
    pub fn is_info(self) -> bool {
        matches!(
            self,
            FindingKind::ZeroPageSource | FindingKind::SuspectedZeroBuffer
        )
    }
}

/// One finding with its evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub finding: FindingKind,
    pub info: bool,
    pub request: ReqId,
    pub op: Op,
    pub queue: u16,
    pub lba: u64,
    /// Where in guest memory: the start of the affected range.
    pub gpa: Gpa,
    /// The affected range's length.
    pub len: u64,
    /// How the memory was overwritten, where that applies (zeros, free-poison, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Bytes found changed, where that applies.
    pub bytes: u64,
    /// The other request involved, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_request: Option<ReqId>,
    /// Nanoseconds since the engine started.
    pub at_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// One line a person can read.
    pub detail: String,
}
