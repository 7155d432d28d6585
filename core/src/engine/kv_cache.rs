//! A preallocated key/value cache with fixed batch slots.
//!
//! Every layer owns two tensors of shape `(slots, kv_heads, capacity, head_dim)`, allocated once.
//! A sequence lives in one slot for its whole life; a decode step writes one key/value per
//! active slot at that slot's position and attends over a window `0..w`, where `w` is one past
//! the largest position in the batch. No shape depends on device data, so a step involves no
//! host synchronisation and keeps the same shapes from step to step (what CUDA graph capture
//! needs, given bucketed windows).

use tch::{Device, Kind, Tensor};

/// Which slots a forward pass covers.
#[derive(Debug)]
pub enum SlotSelection {
    /// Slots `start..start + len`, in order: read as a view, no copy.
    Range {
        /// First slot.
        start: i64,
        /// Number of slots (the batch size).
        len: i64,
    },
    /// Arbitrary slots, int64 `(b,)` on the cache's device: read with a gather.
    Indices(Tensor),
}

/// Per-layer key and value storage.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    slots: usize,
    capacity: usize,
}

impl KvCache {
    /// Allocates `layers` pairs of `(slots, kv_heads, capacity, head_dim)` tensors.
    pub fn new(layers: usize, slots: usize, kv_heads: usize, capacity: usize, head_dim: usize, kind: Kind, device: Device) -> Self {
        let shape = [slots as i64, kv_heads as i64, capacity as i64, head_dim as i64];
        let alloc = || (0..layers).map(|_| Tensor::zeros(shape, (kind, device))).collect::<Vec<_>>();
        Self { keys: alloc(), values: alloc(), slots, capacity }
    }

    /// Number of sequences the cache holds at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions per slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the cache.
    pub fn size_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    /// A view for one forward pass over `selection`, attending to positions `0..window`.
    ///
    /// `fresh` says every row starts at position 0 (a prefill of new sequences): attention can
    /// then use the new keys directly with a causal kernel instead of a masked cache read.
    pub fn view(&mut self, selection: SlotSelection, window: i64, fresh: bool) -> CacheView<'_> {
        CacheView { cache: self, selection, window, fresh }
    }

    /// Copies positions `0..len` of slot `from` into slot `to` (a shared prompt prefill).
    pub fn copy_slot(&mut self, from: i64, to: i64, len: i64) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let src = t.narrow(0, from, 1).narrow(2, 0, len);
            t.narrow(0, to, 1).narrow(2, 0, len).copy_(&src);
        }
    }
}

/// The cache as one forward pass sees it.
#[derive(Debug)]
pub struct CacheView<'a> {
    cache: &'a mut KvCache,
    selection: SlotSelection,
    window: i64,
    fresh: bool,
}

impl CacheView<'_> {
    /// Keys attended per row (one past the largest position).
    pub(crate) fn window(&self) -> i64 {
        self.window
    }

    /// Whether every row of this pass starts at position 0.
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Writes `k`, `v` of shape `(b, kv_heads, t, d)` at `positions` `(b, t)`.
    pub(crate) fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor, positions: &Tensor) {
        let b_sz = positions.size()[0];
        let device = positions.device();
        let rows = match &self.selection {
            SlotSelection::Range { start, len } => Tensor::arange_start(*start, start + len, (Kind::Int64, device)),
            SlotSelection::Indices(idx) => idx.shallow_clone(),
        }
        .view([b_sz, 1]);
        // Advanced indices on dims 0 and 2 around a slice: the indexed shape is (b, t, kv_heads, d).
        let indices = [Some(rows), None, Some(positions.shallow_clone())];
        let _ = self.cache.keys[layer].index_put_(&indices, &k.transpose(1, 2), false);
        let _ = self.cache.values[layer].index_put_(&indices, &v.transpose(1, 2), false);
    }

    /// The slot each row of the pass lives in.
    pub(crate) fn slot_ids(&self) -> Vec<i64> {
        match &self.selection {
            SlotSelection::Range { start, len } => (*start..start + len).collect(),
            SlotSelection::Indices(idx) => Vec::<i64>::try_from(idx.to_device(Device::Cpu)).unwrap_or_default(),
        }
    }

    /// One layer's whole key and value tensors, `(slots, kv_heads, capacity, d)`, for kernels
    /// that read the cache in place and write the pass's new keys and values themselves.
    pub(crate) fn layer_storage(&mut self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.cache.keys[layer], &self.cache.values[layer])
    }

    /// Keys and values of the selected slots over the window: `(b, kv_heads, w, d)` each.
    pub(crate) fn read(&self, layer: usize) -> (Tensor, Tensor) {
        let pick = |t: &Tensor| match &self.selection {
            SlotSelection::Range { start, len } => t.narrow(0, *start, *len).narrow(2, 0, self.window),
            SlotSelection::Indices(idx) => t.narrow(2, 0, self.window).index_select(0, idx),
        };
        (pick(&self.cache.keys[layer]), pick(&self.cache.values[layer]))
    }
}
