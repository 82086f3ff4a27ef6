//! What a node runs on: its GPU (from NVML) or its CPU, and what was measured on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::ContentId;
use crate::validate;

/// Content id of a [`HardwareSpec`]: equal specs are the same hardware cell of the tensor.
pub type HardwareId = ContentId;

/// The kind of device that executes the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// General-purpose CPU cores.
    Cpu,
    /// A GPU (CUDA).
    Gpu,
}

/// Facts about a GPU, as NVML reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// CUDA compute capability, major.
    pub compute_major: u32,
    /// CUDA compute capability, minor.
    pub compute_minor: u32,
    /// Maximum SM clock in MHz.
    pub max_sm_clock_mhz: u32,
    /// Maximum memory clock in MHz.
    pub max_mem_clock_mhz: u32,
    /// Enforced power limit in watts.
    pub power_limit_w: f64,
    /// PCIe generation of the link.
    pub pcie_gen: u32,
    /// PCIe link width (lanes).
    pub pcie_width: u32,
}

/// Facts about a CPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuSpec {
    /// Physical cores on the machine.
    pub physical_cores: u32,
    /// Logical CPUs (hardware threads) on the machine.
    pub logical_cpus: u32,
    /// SIMD extensions the engine was built to use (for example `avx2`, `fma`).
    pub simd: Vec<String>,
}

/// The stable part of a hardware profile: what identifies the hardware cell. Two nodes with
/// equal specs share a [`HardwareId`], and their measurements are comparable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareSpec {
    /// CPU or GPU.
    pub device: DeviceKind,
    /// Execution backend of the engine (`cpu`, `cuda`).
    pub backend: String,
    /// Model name of the device (for example `NVIDIA H100 80GB HBM3` or the CPU brand string).
    pub name: String,
    /// Device memory (GPU) or system memory (CPU), in bytes.
    pub memory_bytes: u64,
    /// Parallel units in use: threads the engine runs (CPU) or SMs (GPU).
    pub compute_units: u32,
    /// Present for GPUs.
    pub gpu: Option<GpuSpec>,
    /// Present for CPUs.
    pub cpu: Option<CpuSpec>,
    /// Further stable facts, so that new ones can be added without a new wire version.
    pub attributes: BTreeMap<String, String>,
}

/// Measured capabilities of the hardware (they vary a little from run to run, so they are not
/// part of the id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareMeasurements {
    /// Quantized matrix-multiplication throughput, GFLOP/s.
    pub matmul_gflops: f64,
    /// Memory bandwidth, GB/s.
    pub mem_bandwidth_gbs: f64,
}

/// A node's hardware: the stable spec plus measurements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    /// The identifying part.
    pub spec: HardwareSpec,
    /// Measured capabilities, when a probe ran.
    pub measured: Option<HardwareMeasurements>,
    /// Driver version (GPU) or kernel version (CPU), when known.
    pub driver: Option<String>,
}

impl HardwareProfile {
    /// The hardware cell id: the content id of the spec.
    pub fn id(&self) -> Result<HardwareId> {
        ContentId::of("metainf hardware-spec v1", &self.spec)
    }

    /// Checks ranges and sizes.
    pub fn validate(&self) -> Result<()> {
        let s = &self.spec;
        validate::key("hardware.backend", &s.backend)?;
        validate::nonempty_text("hardware.name", &s.name)?;
        if s.compute_units == 0 {
            return Err(crate::ProtocolError::invalid(
                "hardware.compute_units",
                "must be at least 1",
            ));
        }
        validate::count(
            "hardware.attributes",
            s.attributes.len(),
            validate::MAX_ENTRIES,
        )?;
        for (k, v) in &s.attributes {
            validate::key("hardware.attributes key", k)?;
            validate::text("hardware.attributes value", v)?;
        }
        if let Some(cpu) = &s.cpu {
            validate::count("hardware.cpu.simd", cpu.simd.len(), validate::MAX_ENTRIES)?;
            for f in &cpu.simd {
                validate::key("hardware.cpu.simd", f)?;
            }
        }
        if let Some(gpu) = &s.gpu {
            validate::finite_nonneg("hardware.gpu.power_limit_w", gpu.power_limit_w)?;
        }
        if let Some(m) = &self.measured {
            validate::finite_nonneg("hardware.measured.matmul_gflops", m.matmul_gflops)?;
            validate::finite_nonneg("hardware.measured.mem_bandwidth_gbs", m.mem_bandwidth_gbs)?;
        }
        if let Some(d) = &self.driver {
            validate::text("hardware.driver", d)?;
        }
        Ok(())
    }
}
