#![doc = include_str!("../README.md")]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "cpu")]
pub mod cpu;
pub mod io;
pub mod quant;
pub mod rng;
