//! CPU kernels, with no knowledge of the model: elementwise math (`vecmath`), the layer's
//! elementwise ops as forward/backward pairs (`ops`), f32 matrix products (`gemm`), quantized
//! products (`quant/`), and the threads of a decode step (`crew`).

pub(crate) mod crew;
pub(crate) mod gemm;
pub(crate) mod ops;
pub(crate) mod quant;
pub(crate) mod vecmath;
