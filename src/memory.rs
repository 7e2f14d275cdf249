//! What the machine has and what each child uses: MemTotal from /proc/meminfo, resident
//! memory from /proc (see `process::rss_bytes`), and GPU memory from `nvidia-smi` where it
//! is installed. Reading only; the policy is in `budget`.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long one `nvidia-smi` call may take before it is killed; it can hang on a wedged
/// driver, and nothing in the daemon may wait on it for long.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(3);
/// What a process pays on a GPU before any weights: the CUDA context. Measured: 546 MiB
/// for a model under 1 MB on an H100 (see tests/fixtures/nvidia-smi), 608 MiB on an H200.
pub(crate) const CUDA_CONTEXT_BYTES: u64 = 512 << 20;
/// Host memory the CUDA runtime takes in a process that uses the GPU, beyond what a CPU-only
/// llama-server holds (measured on an H200: a tiny model's child is 334 MiB resident with
/// `-ngl 99` against about 40 MiB on CPU).
pub(crate) const CUDA_HOST_BYTES: u64 = 300 << 20;

/// Total memory of the machine in bytes.
pub(crate) fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// A snapshot of GPU memory: the total over every GPU and what each process uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GpuReading {
    pub total_bytes: u64,
    /// How many GPUs the total covers.
    pub gpus: usize,
    pub used_by_pid: HashMap<u32, u64>,
}

/// GPU memory as last read by the daemon's supervisor thread. Readers never wait for
/// `nvidia-smi` (23 ms a call on an H200): they get the latest reading, and a load asks for
/// a new one with [`Gpu::refresh_soon`].
pub(crate) struct Gpu {
    latest: Mutex<Option<GpuReading>>,
    pokes: (crossbeam_channel::Sender<()>, crossbeam_channel::Receiver<()>),
}

impl Default for Gpu {
    fn default() -> Gpu {
        Gpu { latest: Mutex::new(None), pokes: crossbeam_channel::bounded(1) }
    }
}

impl Gpu {
    /// The latest reading; none on a machine without `nvidia-smi`.
    pub(crate) fn latest(&self) -> Option<GpuReading> {
        self.latest.lock().clone()
    }

    /// Reads the GPUs now (runs `nvidia-smi`); called by the supervisor thread only. False
    /// when `nvidia-smi` is not installed, so the caller can ask much less often.
    pub(crate) fn sample(&self) -> bool {
        let (reading, installed) = match read_gpu() {
            Ok(reading) => (reading, true),
            Err(NotInstalled) => (None, false),
        };
        *self.latest.lock() = reading;
        installed
    }

    /// Asks the supervisor for a new reading soon (after a load); never blocks.
    pub(crate) fn refresh_soon(&self) {
        let _ = self.pokes.0.try_send(());
    }

    /// Where the supervisor hears [`Gpu::refresh_soon`].
    pub(crate) fn pokes(&self) -> &crossbeam_channel::Receiver<()> {
        &self.pokes.1
    }
}

/// `nvidia-smi` is not on PATH.
struct NotInstalled;

fn read_gpu() -> Result<Option<GpuReading>, NotInstalled> {
    let Some(gpus) = nvidia_smi(&["--query-gpu=index,name,memory.total,memory.used,memory.free", "--format=csv"])?
    else {
        return Ok(None);
    };
    let totals = parse_gpu_totals(&gpus);
    if totals.is_empty() {
        return Ok(None);
    }
    let reading = nvidia_smi(&["--query-compute-apps=pid,process_name,used_memory", "--format=csv"])?.map(|apps| {
        GpuReading { total_bytes: totals.iter().sum(), gpus: totals.len(), used_by_pid: parse_compute_apps(&apps) }
    });
    Ok(reading)
}

/// Runs `nvidia-smi` with a deadline; None if it fails or hangs.
fn nvidia_smi(args: &[&str]) -> Result<Option<String>, NotInstalled> {
    let spawned =
        Command::new("nvidia-smi").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(NotInstalled),
        Err(_) => return Ok(None),
    };
    Ok(run_to_end(&mut child))
}

/// The output of `child` once it exits successfully within [`NVIDIA_SMI_TIMEOUT`]; it is
/// killed when it takes longer.
fn run_to_end(child: &mut std::process::Child) -> Option<String> {
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::Builder::new()
        .name("nvidia-smi".into())
        .spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        })
        .ok()?;
    let deadline = Instant::now() + NVIDIA_SMI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                log::warn!("nvidia-smi did not answer in {NVIDIA_SMI_TIMEOUT:?}; ignoring the GPU");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let text = reader.join().ok()?;
    status.success().then_some(text)
}

/// Bytes in a CSV cell such as `546 MiB` or `546` (with `nounits`, MiB).
fn mib_cell(cell: &str) -> Option<u64> {
    let number = cell.trim().trim_end_matches("MiB").trim();
    Some(number.parse::<u64>().ok()? << 20)
}

/// Each GPU's total memory from `--query-gpu=...,memory.total,...` output, with or without
/// the header and units.
pub(crate) fn parse_gpu_totals(csv: &str) -> Vec<u64> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty()).peekable();
    let column = match lines.peek() {
        Some(first) if first.contains("memory.total") => {
            let column = first.split(',').position(|c| c.contains("memory.total"));
            lines.next();
            match column {
                Some(column) => column,
                None => return Vec::new(),
            }
        }
        Some(_) => 2,
        None => return Vec::new(),
    };
    lines.filter_map(|row| mib_cell(row.split(',').nth(column)?)).collect()
}

/// pid → bytes from `--query-compute-apps=pid,process_name,used_memory` output.
pub(crate) fn parse_compute_apps(csv: &str) -> HashMap<u32, u64> {
    let mut used = HashMap::new();
    for line in csv.lines() {
        let cells: Vec<&str> = line.split(',').collect();
        let (Some(pid), Some(memory)) = (cells.first(), cells.last()) else { continue };
        if let (Ok(pid), Some(bytes)) = (pid.trim().parse::<u32>(), mib_cell(memory)) {
            *used.entry(pid).or_insert(0) += bytes;
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real outputs captured on an H100 while llama-server ran (tests/fixtures/nvidia-smi).
    const GPU_CSV: &str = include_str!("../tests/fixtures/nvidia-smi/nvidia-smi-gpu.csv");
    const APPS_CSV: &str = include_str!("../tests/fixtures/nvidia-smi/nvidia-smi-compute-apps.csv");

    #[test]
    fn parses_captured_nvidia_smi_output() {
        assert_eq!(parse_gpu_totals(GPU_CSV), vec![81559 << 20]);
        let apps = parse_compute_apps(APPS_CSV);
        assert_eq!(apps.get(&4831), Some(&(546 << 20)));
        assert_eq!(apps.len(), 1);
    }

    #[test]
    fn parses_noheader_nounits_output() {
        assert_eq!(parse_gpu_totals("0, NVIDIA H100 80GB HBM3, 81559, 555, 80525\n"), vec![81559 << 20]);
        let two = "index, name, memory.total [MiB], memory.used [MiB], memory.free [MiB]\n\
                   0, NVIDIA H200, 143771 MiB, 0 MiB, 143771 MiB\n1, NVIDIA H200, 143771 MiB, 0 MiB, 143771 MiB\n";
        assert_eq!(parse_gpu_totals(two), vec![143771 << 20, 143771 << 20]);
        let apps = parse_compute_apps("4831, /opt/llama-server, 546\n77, other, 10\n");
        assert_eq!(apps.get(&77), Some(&(10 << 20)));
        assert!(parse_compute_apps("No running processes found\n").is_empty());
    }

    #[test]
    fn reads_mem_total() {
        assert!(mem_total() > 0);
    }
}
