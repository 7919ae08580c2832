//! Host weights staged on a device under the VRAM cap ([`crate::weights::vram`]): copies made
//! on use on the compute stream, or begun ahead of use on a second stream from pinned host
//! buffers, so that they overlap the kernels.
//!
//! A copy begun ahead carries a fence, the event its stream records after the upload. Its first
//! use makes the compute stream wait for the fence. When the copy is let go, the compute stream
//! waits for the fence before the stream-ordered free of its buffer, so a copy let go before its
//! use cannot be freed while its upload is still writing.

use super::Backend;
use crate::tensor::Tensor;
use crate::weights::vram::{Staged, Upload};
use cudarc::driver::{result, CudaEvent, CudaStream, DevicePtrMut, PinnedHostSlice};
use std::sync::Arc;

/// A device copy of a host weight.
#[derive(Clone)]
pub(crate) struct StagedCopy {
    /// Dropped before `tensor`, so the wait comes before the free.
    fence: Option<Arc<Fence>>,
    pub(crate) tensor: Tensor,
}

/// The end of an upload begun ahead, and the stream that must wait for it.
struct Fence {
    event: Arc<CudaEvent>,
    compute: Arc<CudaStream>,
}

impl Drop for Fence {
    fn drop(&mut self) {
        let _ = self.compute.wait(&self.event);
    }
}

/// One device's staged weights and its upload lane.
#[derive(Default)]
pub(crate) struct Staging {
    pub(crate) staged: Staged<StagedCopy>,
    lane: Option<CopyLane>,
}

/// The second stream and two pinned buffers it uploads from, used in turn.
struct CopyLane {
    stream: Arc<CudaStream>,
    ring: [Option<Pinned>; 2],
    turn: usize,
}

struct Pinned {
    buf: PinnedHostSlice<u8>,
    /// The end of the last upload from `buf`.
    done: Option<Arc<CudaEvent>>,
}

impl Pinned {
    fn wait_idle(&self) -> Result<(), String> {
        match &self.done {
            Some(e) => e.synchronize().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl Staging {
    /// The device copy of host weight `w` within `budget` bytes of staged weights (`cap`: the
    /// whole cap), with the weights that followed it last time begun ahead.
    pub(crate) fn stage(
        &mut self,
        be: &Backend,
        w: &Tensor,
        budget: usize,
        cap: usize,
    ) -> Result<Tensor, String> {
        self.staged.forget_dropped();
        let mut up = Uploader {
            be,
            lane: &mut self.lane,
        };
        self.staged.stage(w, budget, cap, &mut up).map(|c| c.tensor)
    }
}

struct Uploader<'a> {
    be: &'a Backend,
    lane: &'a mut Option<CopyLane>,
}

impl Uploader<'_> {
    fn lane(&mut self) -> Result<&mut CopyLane, String> {
        if self.lane.is_none() {
            let stream = self.be.ctx.new_stream().map_err(|e| e.to_string())?;
            *self.lane = Some(CopyLane {
                stream,
                ring: [None, None],
                turn: 0,
            });
        }
        Ok(self.lane.as_mut().expect("made above"))
    }
}

impl Upload<StagedCopy> for Uploader<'_> {
    fn now(&mut self, w: &Tensor) -> Result<StagedCopy, String> {
        // A block format goes up as stored, as at load.
        let tensor = super::ops::to_device(w, self.be.ordinal).map_err(|e| e.to_string())?;
        Ok(StagedCopy {
            fence: None,
            tensor,
        })
    }

    fn ahead(&mut self, w: &Tensor) -> Result<StagedCopy, String> {
        let bytes = w.cpu_bytes().map_err(|e| e.to_string())?;
        let n = bytes.len();
        let be = self.be;
        // Allocated in the compute stream's order, so its free is ordered after the kernels.
        let mut dst = be.alloc(n)?;
        let ctx = be.ctx.clone();
        let lane = self.lane()?;
        let slot = &mut lane.ring[lane.turn];
        lane.turn ^= 1;
        if let Some(p) = slot.as_ref() {
            // Its last upload must end before it is written again or freed.
            p.wait_idle()?;
        }
        if slot.as_ref().is_none_or(|p| p.buf.len() < n) {
            *slot = None;
            // SAFETY: the buffer is written below before the upload reads it.
            let buf = unsafe { ctx.alloc_pinned::<u8>(n) }.map_err(|e| e.to_string())?;
            *slot = Some(Pinned { buf, done: None });
        }
        let pinned = slot.as_mut().expect("set above");
        pinned.buf.as_mut_slice().map_err(|e| e.to_string())?[..n].copy_from_slice(bytes);
        // The upload waits for the allocation, queued on the compute stream.
        lane.stream.join(&be.stream).map_err(|e| e.to_string())?;
        if n > 0 {
            let (ptr, _sync) = dst.slice.device_ptr_mut(&lane.stream);
            let src = &pinned.buf.as_slice().map_err(|e| e.to_string())?[..n];
            // SAFETY: `dst` holds `n` bytes; `src` is pinned and stays unwritten until `done`
            // has passed (the ring waits for it), and alive until then (freed only after it).
            unsafe { result::memcpy_htod_async(ptr, src, lane.stream.cu_stream()) }
                .map_err(|e| e.to_string())?;
        }
        let event = Arc::new(lane.stream.record_event(None).map_err(|e| e.to_string())?);
        pinned.done = Some(event.clone());
        Ok(StagedCopy {
            fence: Some(Arc::new(Fence {
                event,
                compute: be.stream.clone(),
            })),
            tensor: Tensor::from_device_buf(w.dtype(), w.shape(), dst),
        })
    }

    fn ready(&mut self, c: &StagedCopy) -> Result<(), String> {
        match &c.fence {
            Some(f) => self.be.stream.wait(&f.event).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}
