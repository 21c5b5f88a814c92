//! Fused f32 kernels for the CPU backend (burn's flex).
//!
//! burn composes a norm, SiLU or attention from several whole-tensor passes, and burn-flex's
//! convolution transposes its input to NHWC on one thread and re-lays its weight out on every
//! call. Each kernel here does the same arithmetic in the fewest passes the operation allows, on
//! every core (rayon's pool, the one `threads` sizes), with gemm for the matrix products and
//! AVX2/FMA code where the CPU has it ([`simd`]).
//!
//! They run only for f32 tensors of the flex backend ([`flex_f32`] says so); every other dtype
//! and device keeps burn's ops (`nn.rs` chooses). The parity tests run the engine on the CPU in
//! f32, so they check these kernels against diffusers; `tests` below checks each kernel against
//! the burn composition it replaces.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod simd;

use burn::tensor::{Bytes, DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor, Layout};
use rayon::prelude::*;

/// The flex tensor under `t` when `t` is a non-empty f32 tensor on the CPU backend (an O(1)
/// clone). Empty tensors are left to burn: the kernels' chunking assumes every dimension > 0.
pub fn flex_f32<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 || t.dims().contains(&0) {
        return None;
    }
    t.clone().try_into_primitive::<Flex>().ok()
}

/// `t` laid out row-major in its own buffer, when it is a CPU tensor (any dtype); `None` on other
/// devices.
pub fn contiguous<const D: usize>(t: &Tensor<D>) -> Option<Tensor<D>> {
    let p = t.clone().try_into_primitive::<Flex>().ok()?;
    Some(Tensor::from_primitive::<Flex>(p.to_contiguous()))
}

/// An f32 tensor read as a dense row-major slice: zero-copy when its layout already is one,
/// copied once otherwise.
pub struct Dense {
    t: FlexTensor,
}

impl Dense {
    pub fn new(t: FlexTensor) -> Self {
        let t = match t.layout().contiguous_offsets() {
            Some(_) => t,
            None => t.to_contiguous(),
        };
        Dense { t }
    }

    pub fn of<const D: usize>(t: &Tensor<D>) -> Option<Self> {
        flex_f32(t).map(Self::new)
    }

    pub fn slice(&self) -> &[f32] {
        let (start, end) = self
            .t
            .layout()
            .contiguous_offsets()
            .expect("made contiguous in new");
        &self.t.storage::<f32>()[start..end]
    }

    pub fn shape(&self) -> &[usize] {
        self.t.layout().shape()
    }
}

/// A strided f32 view (positive strides, in elements) of a flex tensor's storage.
pub struct Strided {
    t: FlexTensor,
}

impl Strided {
    /// `None` when a stride is negative (a flipped view), which the kernels do not take.
    pub fn new(t: FlexTensor) -> Option<Self> {
        if t.layout().strides().iter().any(|&s| s < 0) {
            return None;
        }
        Some(Strided { t })
    }

    /// The whole storage; index it with [`Self::offset`] and [`Self::strides`].
    pub fn storage(&self) -> &[f32] {
        self.t.storage::<f32>()
    }

    pub fn offset(&self) -> usize {
        self.t.layout().start_offset()
    }

    pub fn strides(&self) -> Vec<usize> {
        self.t
            .layout()
            .strides()
            .iter()
            .map(|&s| s as usize)
            .collect()
    }
}

/// A new CPU tensor of `shape` holding `data` (row-major).
pub fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    Tensor::from_primitive::<Flex>(FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(Shape::from(shape.to_vec())),
        DType::F32,
    ))
}

/// A CPU tensor of `shape` over `data` laid out with `strides` (a permuted view of it).
pub fn tensor_strided<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    strides: [usize; D],
) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(FlexTensor::new(
        Bytes::from_elems(data),
        Layout::new(
            Shape::from(shape.to_vec()),
            strides.iter().map(|&s| s as isize).collect(),
            0,
        ),
        DType::F32,
    ))
}

/// `t` `[B, L, H * D]` as `[B, L, H, D]` over the same storage, whatever its strides (burn-flex
/// copies a view that is not contiguous before it reshapes it, as the chunks of a fused q/k/v
/// projection are; splitting the last dimension never needs that copy). `None` for other tensors
/// or when the last dimension is not `heads` times something.
pub fn split_last<const D: usize, const N: usize>(
    t: &Tensor<D>,
    heads: usize,
) -> Option<Tensor<N>> {
    let f = t.clone().try_into_primitive::<Flex>().ok()?;
    let layout = f.layout();
    let (shape, strides) = (layout.shape().to_vec(), layout.strides().to_vec());
    let last = *shape.last()?;
    if N != D + 1 || heads == 0 || last % heads != 0 {
        return None;
    }
    let inner = *strides.last()?;
    let mut new_shape = shape[..D - 1].to_vec();
    new_shape.extend([heads, last / heads]);
    let mut new_strides = strides[..D - 1].to_vec();
    new_strides.extend([inner * (last / heads) as isize, inner]);
    let start = layout.start_offset();
    let view = f.with_layout(Layout::new(Shape::from(new_shape), new_strides, start));
    Some(Tensor::from_primitive::<Flex>(view))
}

/// A matrix read in place: element `(r, c)` at `ptr + r * rs + c * cs` (strides in elements).
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// Row-major, `rs` values from one row to the next.
    pub(crate) fn rows(ptr: *const f32, rs: usize) -> Self {
        Operand {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// Column-major, `cs` values from one column to the next (a transposed row-major matrix).
    pub(crate) fn columns(ptr: *const f32, cs: usize) -> Self {
        Operand {
            ptr,
            rs: 1,
            cs: cs as isize,
        }
    }
}

/// `dst = scale * lhs @ rhs` (`m x k` times `k x n`), or `dst += ...` with `accumulate`, on the
/// calling thread: every kernel spreads its own tasks over the pool. `dst` is row-major with
/// `dst_rs` values from one row to the next.
///
/// # Safety
/// The operands must be valid for reads of their `m x k` and `k x n` elements, `dst` for reads and
/// writes of its `m x n`, and no other thread may touch that part of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
) {
    // SAFETY: the caller's promise, in gemm's terms (dst column stride 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Rows handed to one rayon task by [`par_rows`]: enough work to be worth a task, small enough
/// to spread over the pool.
const ROW_CHUNK: usize = 16;

/// A new buffer of `rows` rows of `width` values, `f(r, row)` filling row `r`, spread over the
/// pool. Each task zeroes its own rows just before it fills them (in cache, on its own core):
/// `vec![0.0; n]` first would be one serial pass over the whole buffer on the calling thread,
/// which with fresh output buffers for every op was most of what the transformer's small ops
/// cost there (`perf`).
pub(crate) fn par_rows(
    rows: usize,
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    par_chunks(rows * width, ROW_CHUNK * width, |chunk, part| {
        for (i, row) in part.chunks_mut(width).enumerate() {
            f(chunk * ROW_CHUNK + i, row);
        }
    })
}

/// A new buffer of `len` values in chunks of `chunk` (the last may be shorter), `f(i, part)`
/// filling chunk `i`, one task per chunk, each zeroing its chunk first (see [`par_rows`]).
pub(crate) fn par_chunks(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let chunk = chunk.max(1);
    let mut out = Vec::<f32>::with_capacity(len);
    let dst = SendPtr(out.as_mut_ptr());
    (0..len.div_ceil(chunk)).into_par_iter().for_each(|i| {
        let start = i * chunk;
        // SAFETY: values start..start + n are inside the buffer's capacity and this task's
        // alone; they are zeroed (valid f32) before a slice is made of them.
        let part = unsafe { zeroed(dst.at(start), chunk.min(len - start)) };
        f(i, part);
    });
    // SAFETY: every chunk was zeroed (and filled) above.
    unsafe { out.set_len(len) };
    out
}

/// `len` values at `ptr` zeroed and lent as a slice.
///
/// # Safety
/// `ptr` is valid for writes of `len` values, which nothing else touches while the slice lives.
pub(crate) unsafe fn zeroed<'a>(ptr: *mut f32, len: usize) -> &'a mut [f32] {
    // SAFETY: the caller's promise.
    unsafe {
        std::ptr::write_bytes(ptr, 0, len);
        std::slice::from_raw_parts_mut(ptr, len)
    }
}

/// Pointers handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(*mut f32);
// SAFETY: each task writes a range no other task touches (every use says which).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        SendPtr(buf.as_mut_ptr())
    }

    /// The pointer `i` elements in (a method, so closures capture the `Sync` wrapper, not the
    /// raw pointer field).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

#[cfg(test)]
mod tests;
