//! Where the models run: `DEVICE` (auto, cpu, cuda, cuda:N) resolved against the CUDA devices
//! libtorch sees.

use tch::Device;

use super::error::LoadError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn parse(text: &str) -> Result<Self, LoadError> {
        let t = text.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => {
                t.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda).ok_or_else(|| {
                    LoadError::Invalid(format!("DEVICE must be auto, cpu, cuda or cuda:N, got {text:?}"))
                })
            }
        }
    }

    /// Picks the device; `cuda_devices` is how many CUDA devices libtorch sees.
    pub fn resolve(self, cuda_devices: usize) -> Result<Device, LoadError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if cuda_devices > 0 => Ok(Device::Cuda(0)),
            Self::Auto => {
                tracing::info!("DEVICE=auto: no CUDA device available, running on CPU");
                Ok(Device::Cpu)
            }
            Self::Cuda(n) if n < cuda_devices => Ok(Device::Cuda(n)),
            Self::Cuda(n) => Err(LoadError::Device(format!(
                "DEVICE=cuda:{n} was asked for but libtorch sees {cuda_devices} CUDA device(s) \
                 (no driver, no GPU, or a CPU-only libtorch); use DEVICE=cpu or DEVICE=auto"
            ))),
        }
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse() {
        assert_eq!(DeviceChoice::parse("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(DeviceChoice::parse("CPU").unwrap(), DeviceChoice::Cpu);
        assert_eq!(DeviceChoice::parse("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::parse("cuda:3").unwrap(), DeviceChoice::Cuda(3));
        assert!(DeviceChoice::parse("cuda:x").is_err());
        assert!(DeviceChoice::parse("gpu").is_err());
    }

    #[test]
    fn auto_falls_back_to_cpu_and_explicit_cuda_fails_without_a_gpu() {
        assert_eq!(DeviceChoice::Auto.resolve(0).unwrap(), Device::Cpu);
        assert_eq!(DeviceChoice::Auto.resolve(2).unwrap(), Device::Cuda(0));
        assert_eq!(DeviceChoice::Cuda(1).resolve(2).unwrap(), Device::Cuda(1));
        let err = DeviceChoice::Cuda(0).resolve(0).unwrap_err().to_string();
        assert!(err.contains("DEVICE=cuda:0") && err.contains("0 CUDA device"), "{err}");
        assert!(DeviceChoice::Cuda(2).resolve(2).is_err());
    }
}
