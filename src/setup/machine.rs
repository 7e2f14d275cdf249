//! What this machine has (an NVIDIA GPU and nvcc, the Vulkan SDK, AMX units, the tools a
//! build needs) and which llama-server backend to build for it.

use std::path::PathBuf;
use std::process::Command;

use super::*;
use crate::llama_server::Backend;

/// What kind of llama-server to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendChoice {
    Cpu,
    Cuda,
    Vulkan,
}

/// What this machine has for a GPU build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Probes {
    /// The CUDA compiler, on PATH or in /usr/local/cuda.
    pub nvcc: Option<PathBuf>,
    /// Compute capabilities of the NVIDIA GPUs, as `nvidia-smi` reports them ("9.0").
    pub compute_caps: Vec<String>,
    /// The Vulkan SDK: `glslc` and the Vulkan headers.
    pub vulkan_sdk: bool,
}

impl Probes {
    pub(crate) fn of_this_machine() -> Probes {
        let nvcc = find_on_path("nvcc").or_else(|| {
            let default = PathBuf::from("/usr/local/cuda/bin/nvcc");
            llama_server::is_executable(&default).then_some(default)
        });
        let compute_caps = Command::new("nvidia-smi")
            .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|cap| !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit() || c == '.'))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let headers = std::env::var_os("VULKAN_SDK").map(|sdk| PathBuf::from(sdk).join("include/vulkan/vulkan.h"));
        let vulkan_sdk = find_on_path("glslc").is_some()
            && headers.into_iter().chain([PathBuf::from("/usr/include/vulkan/vulkan.h")]).any(|h| h.exists());
        Probes { nvcc, compute_caps, vulkan_sdk }
    }

    pub(crate) fn has_nvidia_gpu(&self) -> bool {
        !self.compute_caps.is_empty()
    }
}

/// The backend to build: what was asked for, else the best this machine has. A GPU
/// backend asked for without what it needs is an error that names what is missing.
pub(crate) fn choose_backend(probes: &Probes, requested: Option<BackendChoice>, portable: bool) -> Result<Backend> {
    let cuda = || -> Result<Backend> {
        if probes.nvcc.is_none() {
            return Err(Error::Setup {
                message: "a CUDA build needs the CUDA toolkit (nvcc), which is not installed".into(),
            });
        }
        let mut architectures: Vec<String> = probes.compute_caps.iter().map(|cap| cap.replace('.', "")).collect();
        architectures.sort();
        architectures.dedup();
        if architectures.is_empty() {
            return Err(Error::Setup {
                message: "a CUDA build is for this machine's GPUs, but nvidia-smi finds none".into(),
            });
        }
        Ok(Backend::Cuda { architectures: architectures.join(";") })
    };
    match requested {
        Some(BackendChoice::Cpu) => Ok(Backend::Cpu { portable }),
        Some(BackendChoice::Cuda) => cuda(),
        Some(BackendChoice::Vulkan) if probes.vulkan_sdk => Ok(Backend::Vulkan),
        Some(BackendChoice::Vulkan) => Err(Error::Setup {
            message: "a Vulkan build needs the Vulkan SDK (glslc and the Vulkan headers), which is not installed"
                .into(),
        }),
        None if probes.nvcc.is_some() && probes.has_nvidia_gpu() => cuda(),
        None if probes.vulkan_sdk => Ok(Backend::Vulkan),
        None => Ok(Backend::Cpu { portable }),
    }
}

impl Backend {
    /// The CMake options for this backend, beyond [`CMAKE_OPTIONS`].
    pub(crate) fn cmake_options(&self) -> Vec<String> {
        match self {
            Backend::Cpu { portable } => vec![format!("-DGGML_NATIVE={}", if *portable { "OFF" } else { "ON" })],
            Backend::CpuWithoutAmx => {
                let flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
                vec![
                    "-DGGML_NATIVE=ON".into(),
                    format!("-DCMAKE_C_FLAGS={flags}"),
                    format!("-DCMAKE_CXX_FLAGS={flags}"),
                ]
            }
            Backend::Cuda { architectures } => vec![
                "-DGGML_NATIVE=ON".into(),
                "-DGGML_CUDA=ON".into(),
                format!("-DCMAKE_CUDA_ARCHITECTURES={architectures}"),
            ],
            Backend::Vulkan => vec!["-DGGML_NATIVE=ON".into(), "-DGGML_VULKAN=ON".into()],
        }
    }
}

/// True when the CPU reports AMX units (`amx_tile` in /proc/cpuinfo).
pub(super) fn cpu_reports_amx() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|cpuinfo| cpuinfo.contains(" amx_tile"))
}

pub(super) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| llama_server::is_executable(p))
    })
}

pub(super) fn require_tool(name: &str, package_hint: &str) -> Result<()> {
    if find_on_path(name).is_some() {
        Ok(())
    } else {
        Err(Error::Setup {
            message: format!(
                "`{name}` is needed to build llama-server but is not installed; install it \
                 (Debian/Ubuntu: apt-get install {package_hint}) and run `llmctl setup` again, \
                 or name a llama-server you already have with `llama_server = \"PATH\"` in the config"
            ),
        })
    }
}

pub(super) fn require_compiler() -> Result<()> {
    ["c++", "g++", "clang++"].iter().find(|name| find_on_path(name).is_some()).map(|_| ()).ok_or_else(|| Error::Setup {
        message: "no C++ compiler (c++, g++ or clang++) is installed; install one \
                      (Debian/Ubuntu: apt-get install g++) and run `llmctl setup` again"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama_server::Backend;

    #[test]
    fn backends_are_chosen_from_what_the_machine_has() {
        let h200 = Probes {
            nvcc: Some("/usr/local/cuda/bin/nvcc".into()),
            compute_caps: vec!["9.0".into()],
            vulkan_sdk: false,
        };
        let gpu_without_toolkit = Probes { nvcc: None, ..h200.clone() };
        let vulkan = Probes { vulkan_sdk: true, ..Probes::default() };
        let nothing = Probes::default();
        let table: Vec<(&str, &Probes, Option<BackendChoice>, Option<Backend>)> = vec![
            ("a GPU and nvcc", &h200, None, Some(Backend::Cuda { architectures: "90".into() })),
            ("a GPU without the toolkit", &gpu_without_toolkit, None, Some(Backend::Cpu { portable: false })),
            ("the Vulkan SDK", &vulkan, None, Some(Backend::Vulkan)),
            ("nothing", &nothing, None, Some(Backend::Cpu { portable: false })),
            ("CPU asked for on a GPU machine", &h200, Some(BackendChoice::Cpu), Some(Backend::Cpu { portable: false })),
            ("CUDA asked for without a toolkit", &gpu_without_toolkit, Some(BackendChoice::Cuda), None),
            ("Vulkan asked for without the SDK", &h200, Some(BackendChoice::Vulkan), None),
        ];
        for (name, probes, requested, expected) in table {
            assert_eq!(choose_backend(probes, requested, false).ok(), expected, "{name}");
        }
        let two = Probes { compute_caps: vec!["8.6".into(), "9.0".into(), "8.6".into()], ..h200.clone() };
        let backend = choose_backend(&two, None, false).unwrap();
        assert_eq!(backend.cmake_options().last().unwrap(), "-DCMAKE_CUDA_ARCHITECTURES=86;90");
        assert_eq!(Backend::from_dir_name(&backend.dir_name()), Some(backend));
        assert_eq!(Backend::Cpu { portable: false }.cmake_options(), ["-DGGML_NATIVE=ON"]);
        let without_amx = Backend::CpuWithoutAmx;
        assert!(without_amx.cmake_options().iter().any(|o| o.contains("-mno-amx-int8")));
        assert_eq!(Backend::from_dir_name(&without_amx.dir_name()), Some(without_amx));
    }
}
