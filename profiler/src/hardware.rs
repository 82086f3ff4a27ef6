//! The hardware probe: the GPU through NVML, or the CPU when there is no GPU (or no NVML).
//!
//! A machine without NVML is the common case for CPU nodes: the probe logs why it fell back and
//! profiles the CPU, never panics. Measurements (quantized matmul GFLOP/s, memory bandwidth) run
//! with the thread limit the engine will use, so one machine can present genuinely different
//! hardware at different `--threads`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use metainf_protocol::{
    CpuSpec, DeviceKind, GpuSpec, HardwareMeasurements, HardwareProfile, HardwareSpec,
};
use tracing::info;

use crate::error::Result;

/// What to probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Threads the engine will use on the CPU; `None` = every logical CPU.
    pub threads: Option<usize>,
    /// Look for a GPU through NVML first.
    pub gpu: bool,
    /// Run the measurements (about a second); off gives the spec only.
    pub measure: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            threads: None,
            gpu: true,
            measure: true,
        }
    }
}

/// Probes the device the engine runs on: the first NVML GPU if there is one and this build's
/// engine runs on GPUs, else the CPU. Records are filed under this profile, so it must be the
/// device that did the work, not merely one that is present.
pub fn probe(options: &ProbeOptions) -> Result<HardwareProfile> {
    if options.gpu {
        match probe_gpu() {
            Ok(profile) if crate::engine::RUNS_ON_GPU => return Ok(profile),
            Ok(profile) => info!(
                gpu = %profile.spec.name,
                "a GPU is present, but this build runs the engine on the CPU; profiling the CPU"
            ),
            Err(reason) => info!(%reason, "no GPU through NVML; profiling the CPU"),
        }
    }
    probe_cpu(options)
}

/// The first GPU NVML reports, or why there is none.
pub fn probe_gpu() -> std::result::Result<HardwareProfile, String> {
    use nvml_wrapper::Nvml;
    use nvml_wrapper::enum_wrappers::device::Clock;
    let nvml = Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    if count == 0 {
        return Err("NVML reports no GPU".into());
    }
    let dev = nvml.device_by_index(0).map_err(|e| e.to_string())?;
    let name = dev.name().map_err(|e| e.to_string())?;
    let memory = dev.memory_info().map_err(|e| e.to_string())?;
    let cc = dev.cuda_compute_capability().map_err(|e| e.to_string())?;
    let cores = dev.num_cores().unwrap_or(0);
    let (major, minor) = (
        u32::try_from(cc.major).unwrap_or(0),
        u32::try_from(cc.minor).unwrap_or(0),
    );
    let sm_count = match cores_per_sm(major, minor) {
        Some(per) if cores > 0 => cores / per,
        _ => 0,
    };
    let gpu = GpuSpec {
        sm_count,
        compute_major: major,
        compute_minor: minor,
        max_sm_clock_mhz: dev.max_clock_info(Clock::SM).unwrap_or(0),
        max_mem_clock_mhz: dev.max_clock_info(Clock::Memory).unwrap_or(0),
        power_limit_w: f64::from(dev.enforced_power_limit().unwrap_or(0)) / 1000.0,
        pcie_gen: dev.max_pcie_link_gen().unwrap_or(0),
        pcie_width: dev.max_pcie_link_width().unwrap_or(0),
    };
    let mut attributes = BTreeMap::new();
    attributes.insert("gpu_count".to_owned(), count.to_string());
    attributes.insert("cuda_cores".to_owned(), cores.to_string());
    Ok(HardwareProfile {
        spec: HardwareSpec {
            device: DeviceKind::Gpu,
            backend: "cuda".into(),
            name,
            memory_bytes: memory.total,
            compute_units: sm_count.max(1),
            gpu: Some(gpu),
            cpu: None,
            attributes,
        },
        measured: None,
        driver: nvml.sys_driver_version().ok(),
    })
}

/// CUDA cores per streaming multiprocessor by compute capability.
fn cores_per_sm(major: u32, minor: u32) -> Option<u32> {
    match (major, minor) {
        (3, _) => Some(192),
        (5, _) => Some(128),
        (6, 0) => Some(64),
        (6, _) => Some(128),
        (7, _) => Some(64),
        (8, 0) => Some(64),
        (8, _) => Some(128),
        (9, 0) => Some(128),
        (10 | 12, _) => Some(128),
        _ => None,
    }
}

pub use crate::engine::threads::{MAX_THREADS_PER_CPU, engine_threads};

/// Facts about the CPU from /proc, with `threads` engine threads (see [`engine_threads`]).
pub fn cpu_spec(threads: Option<usize>) -> HardwareSpec {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let name = field("model name")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown CPU".into());
    let logical = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    // Physical cores: distinct (physical id, core id) pairs.
    let mut cores = std::collections::BTreeSet::new();
    let (mut phys, mut core) = (None, None);
    for line in cpuinfo.lines() {
        match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("physical id", v)) => phys = Some(v.to_owned()),
            Some(("core id", v)) => core = Some(v.to_owned()),
            _ if line.trim().is_empty() => {
                if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                    cores.insert((p, c));
                }
            }
            _ => {}
        }
    }
    let physical = if cores.is_empty() {
        logical
    } else {
        cores.len()
    };
    let flags = field("flags").unwrap_or_default();
    let simd: Vec<String> = [
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .map(str::to_owned)
    .collect();
    let memory_bytes = meminfo_bytes("MemTotal:");
    let threads = engine_threads(threads);
    HardwareSpec {
        device: DeviceKind::Cpu,
        backend: "cpu".into(),
        name,
        memory_bytes,
        compute_units: u32::try_from(threads).unwrap_or(u32::MAX),
        gpu: None,
        cpu: Some(CpuSpec {
            physical_cores: u32::try_from(physical).unwrap_or(u32::MAX),
            logical_cpus: u32::try_from(logical).unwrap_or(u32::MAX),
            simd,
        }),
        attributes: BTreeMap::new(),
    }
}

/// Memory the kernel reports as available to new work (`MemAvailable` in /proc/meminfo), in
/// bytes; 0 where unknown. Announced in heartbeats; GPUs will report device memory.
pub fn available_memory_bytes() -> u64 {
    meminfo_bytes("MemAvailable:")
}

/// One `kB` field of /proc/meminfo, in bytes (0 where unknown).
fn meminfo_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// The CPU profile, measured with `threads` threads.
pub fn probe_cpu(options: &ProbeOptions) -> Result<HardwareProfile> {
    let spec = cpu_spec(options.threads);
    let threads = spec.compute_units as usize;
    let measured = if options.measure {
        Some(HardwareMeasurements {
            matmul_gflops: quantized_matmul_gflops(threads, Duration::from_millis(600))?,
            mem_bandwidth_gbs: memory_bandwidth_gbs(threads, Duration::from_millis(300)),
        })
    } else {
        None
    };
    let driver = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| format!("linux {}", s.trim()));
    Ok(HardwareProfile {
        spec,
        measured,
        driver,
    })
}

/// GFLOP/s of the engine's own Q8_0 matmul kernels on a pool of `threads` threads, for
/// about `budget`: 4 activation rows × a 1024 × 1024 weight (a small decode batch).
pub fn quantized_matmul_gflops(threads: usize, budget: Duration) -> Result<f64> {
    crate::engine::model::matmul_gflops(threads, budget)
}

/// Aggregate memory bandwidth in GB/s (bytes read plus written) of `threads` threads copying
/// 32 MiB buffers, well beyond any cache.
pub fn memory_bandwidth_gbs(threads: usize, budget: Duration) -> f64 {
    const BYTES: usize = 32 << 20;
    let start = Instant::now();
    let moved: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let src = vec![1u8; BYTES];
                    let mut dst = vec![0u8; BYTES];
                    let mut n = 0u64;
                    let t = Instant::now();
                    while t.elapsed() < budget {
                        dst.copy_from_slice(&src);
                        std::hint::black_box(&mut dst);
                        n += 1;
                    }
                    n * 2 * BYTES as u64
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    moved as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_is_the_device_the_engine_runs_on() {
        // Looking for a GPU (NVML present or not): the CPU engine's records say CPU.
        let p = probe(&ProbeOptions {
            threads: Some(1),
            gpu: true,
            measure: false,
        })
        .unwrap();
        const { assert!(!crate::engine::RUNS_ON_GPU) };
        assert_eq!(p.spec.device, metainf_protocol::DeviceKind::Cpu);
        assert_eq!(p.spec.backend, "cpu");
    }

    #[test]
    fn the_cpu_profile_is_sane_and_the_thread_limit_is_part_of_the_id() {
        let one = probe_cpu(&ProbeOptions {
            threads: Some(1),
            gpu: false,
            measure: true,
        })
        .unwrap();
        one.validate().unwrap();
        assert_eq!(one.spec.compute_units, 1);
        assert!(one.spec.memory_bytes > 0);
        let cpu = one.spec.cpu.as_ref().unwrap();
        assert!(cpu.logical_cpus >= 1 && cpu.physical_cores >= 1);
        let m = one.measured.as_ref().unwrap();
        assert!(m.matmul_gflops > 0.1, "{m:?}");
        assert!(m.mem_bandwidth_gbs > 0.1, "{m:?}");
        // Oversubscription is honoured up to 4 threads per CPU; a different count is another
        // cell.
        let logical = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(
            cpu_spec(Some(logical as usize + 1)).compute_units,
            logical + 1
        );
        assert_eq!(cpu_spec(Some(10_000)).compute_units, 4 * logical);
        assert_eq!(cpu_spec(None).compute_units, logical);
        if cpu.logical_cpus > 1 {
            let two = probe_cpu(&ProbeOptions {
                threads: Some(2),
                gpu: false,
                measure: false,
            })
            .unwrap();
            assert_ne!(one.id().unwrap(), two.id().unwrap());
        }
        // Measurements are not part of the id: a re-probe lands in the same cell.
        let again = probe_cpu(&ProbeOptions {
            threads: Some(1),
            gpu: false,
            measure: false,
        })
        .unwrap();
        assert_eq!(one.id().unwrap(), again.id().unwrap());
    }

    #[test]
    fn without_nvml_the_probe_falls_back_to_the_cpu() {
        // On machines without an NVIDIA driver NVML cannot load: a reason, not a panic.
        if let Err(reason) = probe_gpu() {
            assert!(!reason.is_empty());
            let p = probe(&ProbeOptions {
                threads: Some(1),
                gpu: true,
                measure: false,
            })
            .unwrap();
            assert_eq!(p.spec.device, DeviceKind::Cpu);
        }
    }

    #[test]
    fn cores_per_sm_covers_current_architectures() {
        assert_eq!(cores_per_sm(8, 0), Some(64)); // A100
        assert_eq!(cores_per_sm(9, 0), Some(128)); // H100/H200: 16896 / 128 = 132 SMs
        assert_eq!(cores_per_sm(8, 9), Some(128));
        assert_eq!(cores_per_sm(1, 0), None);
    }
}
