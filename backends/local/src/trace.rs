//! Intermediate values for parity tests. The serving entry points
//! ([`Transformer::forward`](crate::transformer::Transformer::forward),
//! [`Pipeline::generate`](crate::pipeline::Pipeline::generate)) neither take nor return them;
//! their `*_traced` twins run the same computation and hand each named intermediate value to a
//! hook as it is computed, so a test can compare it with the reference's, stage by stage. The
//! serving path never calls the traced entry points; a hook sees borrowed tensors and reads only
//! what it wants (see [`TensorView::to_f32_vec`]).

use std::fmt::Display;

use burn::tensor::{FloatDType, Tensor};

/// An intermediate value as a trace hook sees it: borrowed for the duration of the call.
#[derive(Clone, Copy, Debug)]
pub enum TensorView<'a> {
    D2(&'a Tensor<2>),
    D3(&'a Tensor<3>),
    D4(&'a Tensor<4>),
}

impl TensorView<'_> {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            TensorView::D2(t) => t.dims().to_vec(),
            TensorView::D3(t) => t.dims().to_vec(),
            TensorView::D4(t) => t.dims().to_vec(),
        }
    }

    /// The values, row-major, widened to f32 and read back from the device (empty if the
    /// read-back fails).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        fn read<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
            t.clone()
                .cast(FloatDType::F32)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        }
        match self {
            TensorView::D2(t) => read(*t),
            TensorView::D3(t) => read(*t),
            TensorView::D4(t) => read(*t),
        }
    }
}

impl<'a> From<&'a Tensor<2>> for TensorView<'a> {
    fn from(t: &'a Tensor<2>) -> Self {
        TensorView::D2(t)
    }
}

impl<'a> From<&'a Tensor<3>> for TensorView<'a> {
    fn from(t: &'a Tensor<3>) -> Self {
        TensorView::D3(t)
    }
}

impl<'a> From<&'a Tensor<4>> for TensorView<'a> {
    fn from(t: &'a Tensor<4>) -> Self {
        TensorView::D4(t)
    }
}

/// A trace hook: called with each intermediate value's name and the value.
pub type Hook<'a> = dyn FnMut(&str, TensorView<'_>) + 'a;

/// Where a run sends its intermediate values: nowhere (the serving path: nothing is named,
/// read or kept) or to a test's hook.
pub(crate) struct Taps<'a>(Option<&'a mut Hook<'a>>);

impl<'a> Taps<'a> {
    pub fn off() -> Self {
        Taps(None)
    }

    pub fn to(hook: &'a mut Hook<'a>) -> Self {
        Taps(Some(hook))
    }

    /// Hand `value` to the hook as `name` (formatted only when there is a hook).
    pub fn tap<'t>(&mut self, name: impl Display, value: impl Into<TensorView<'t>>) {
        if let Some(hook) = self.0.as_deref_mut() {
            hook(&name.to_string(), value.into());
        }
    }
}
