//! What the pinning tests need to see of the guest's memory management:
//! anonymous pages, where they sit in guest-physical memory, the pin counters,
//! and fork.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::ptr::NonNull;

use crate::io::PAGE;
use crate::Stop;

/// One private anonymous page, unmapped on drop.
pub struct AnonPage {
    ptr: NonNull<u8>,
}

impl AnonPage {
    /// Maps a page; it is not faulted in until touched.
    pub fn map() -> Result<AnonPage, Stop> {
        // SAFETY: an anonymous private mapping of one page at an address of the
        // kernel's choosing; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Stop::Error(format!(
                "mmap of a page failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| Stop::Error("mmap gave null".into()))?;
        Ok(AnonPage { ptr })
    }

    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Fills the page (faulting it in, writable).
    pub fn fill(&self, byte: u8) {
        for i in 0..PAGE {
            self.write(i, byte);
        }
    }

    /// One byte, read volatile: the device may write the page at any time.
    pub fn read(&self, at: usize) -> u8 {
        assert!(at < PAGE);
        // SAFETY: `at` is inside the mapped page, which lives as long as `self`.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(at)) }
    }

    pub fn write(&self, at: usize, byte: u8) {
        assert!(at < PAGE);
        // SAFETY: as in `read`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(at), byte) }
    }

    /// `len` bytes from `at`, read volatile.
    pub fn bytes(&self, at: usize, len: usize) -> Vec<u8> {
        (at..at + len).map(|i| self.read(i)).collect()
    }
}

// SAFETY: the page is only ever accessed through volatile reads and writes of
// single bytes (and by the kernel's DMA), never through a shared Rust reference,
// so moving or sharing the handle between threads is sound.
unsafe impl Send for AnonPage {}
// SAFETY: as above.
unsafe impl Sync for AnonPage {}

impl Drop for AnonPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE) };
    }
}

/// The page frame behind a virtual address of this process, from
/// `/proc/self/pagemap` (root sees frame numbers); `None` if not present.
pub fn pfn(addr: usize) -> Result<Option<u64>, Stop> {
    let mut f = fs::File::open("/proc/self/pagemap")
        .map_err(|e| Stop::Error(format!("cannot open /proc/self/pagemap: {e}")))?;
    f.seek(SeekFrom::Start((addr / PAGE) as u64 * 8))
        .and_then(|_| {
            let mut entry = [0u8; 8];
            f.read_exact(&mut entry).map(|()| u64::from_le_bytes(entry))
        })
        .map(|e| {
            (e >> 63 == 1)
                .then_some(e & ((1 << 55) - 1))
                .filter(|&p| p != 0)
        })
        .map_err(|e| Stop::Error(format!("cannot read /proc/self/pagemap: {e}")))
}

/// A page frame (from [`pfn`]) as the guest-physical address of its first
/// byte, the way the device lists addresses; "not present" for none.
pub fn frame_gpa(pfn: Option<u64>) -> String {
    pfn.map_or("not present".to_owned(), |p| {
        format!("{:#x}", p * PAGE as u64)
    })
}

/// The guest-physical address of the zero page: the frame behind a page that
/// was only ever read (a read fault maps the shared zero page).
pub fn zero_page_gpa() -> Result<u64, Stop> {
    let page = AnonPage::map()?;
    let _ = page.read(0);
    let frame = pfn(page.addr())?
        .ok_or_else(|| Stop::Error("a read-faulted page shows no frame in pagemap".into()))?;
    Ok(frame * PAGE as u64)
}

/// FOLL_PIN pins held now: `nr_foll_pin_acquired - nr_foll_pin_released` from
/// `/proc/vmstat`. The counters are batched per cpu; writing
/// `/proc/sys/vm/stat_refresh` first folds the batches in (as root).
pub fn pins() -> Result<i64, Stop> {
    let _ = fs::write("/proc/sys/vm/stat_refresh", "1");
    let text = fs::read_to_string("/proc/vmstat")
        .map_err(|e| Stop::Error(format!("cannot read /proc/vmstat: {e}")))?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<i64>().ok())
            .ok_or_else(|| Stop::Skip(format!("/proc/vmstat has no {key}")))
    };
    Ok(get("nr_foll_pin_acquired ")? - get("nr_foll_pin_released ")?)
}

/// Forks; the child runs `child` (only async-signal-safe work: touching
/// memory) and exits at once; the parent waits for it. Returns the child's
/// exit status.
pub fn fork_and_wait(child: impl FnOnce()) -> Result<i32, Stop> {
    // SAFETY: the child only runs `child` (plain memory accesses) and _exit, both
    // safe after fork in a multithreaded process.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Stop::Error(format!(
            "fork failed: {}",
            std::io::Error::last_os_error()
        ))),
        0 => {
            child();
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child with a valid status pointer.
            if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                return Err(Stop::Error(format!(
                    "waitpid failed: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(status)
        }
    }
}
