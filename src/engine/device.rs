//! Device names as users write them (cpu, cuda, cuda:N), checked against what is present.
use crate::error::{Error, Result};

pub fn parse(s: &str) -> Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        "cuda" => Err(Error::Config("device 'cuda' was asked for but CUDA is not available here".into())),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n < tch::Cuda::device_count().max(0) as usize => Ok(tch::Device::Cuda(n)),
            Some(n) => Err(Error::Config(format!("device '{s}': there are {} CUDA devices here, so cuda:{n} does not exist", tch::Cuda::device_count()))),
            None => Err(Error::Config(format!("unknown device '{s}' (use cpu, cuda or cuda:N)"))),
        },
    }
}
