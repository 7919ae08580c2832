//! Where a tensor lives, and how a user names it: `cpu`, `cuda`, `cuda:N` or `auto`.

use std::fmt;

/// A tensor's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// What a user asked for: a device, or the best one present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Exactly(Device),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device '{s}': expected cpu, cuda, cuda:N or auto");
        Ok(match s.trim() {
            "auto" => DeviceRequest::Auto,
            "cpu" => DeviceRequest::Exactly(Device::Cpu),
            "cuda" => DeviceRequest::Exactly(Device::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                DeviceRequest::Exactly(Device::Cuda(n.parse().map_err(|_| bad())?))
            }
        })
    }
}

impl Device {
    /// Resolves a request: `Auto` is the first CUDA device when one works, else the CPU (the
    /// message says why). An explicit CUDA device that cannot be used is an error.
    pub fn resolve(request: DeviceRequest) -> Result<(Device, Option<String>), String> {
        match request {
            DeviceRequest::Exactly(Device::Cpu) => Ok((Device::Cpu, None)),
            DeviceRequest::Exactly(Device::Cuda(n)) => crate::kernels::cuda_available(n)
                .map(|()| (Device::Cuda(n), None))
                .map_err(|why| format!("cannot use cuda:{n}: {why}")),
            DeviceRequest::Auto => match crate::kernels::cuda_available(0) {
                Ok(()) => Ok((Device::Cuda(0), Some("using cuda:0".into()))),
                Err(why) => Ok((Device::Cpu, Some(format!("using the CPU: {why}")))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Exactly(Device::Cpu)));
        assert_eq!(
            "cuda:2".parse(),
            Ok(DeviceRequest::Exactly(Device::Cuda(2)))
        );
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Exactly(Device::Cuda(0))));
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }
}
