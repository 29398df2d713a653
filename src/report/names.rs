//! The dtype and device as a spec spells them ("float32", "cpu", "cuda:1"). The manifest records
//! tch's Debug names ("Float", "Cpu", "Cuda(1)", "[Cpu, Cuda(1)]" for replicas: graph/manifest.rs
//! and graph/executor.rs), which the report showed as they were. The manifest keeps them
//! (tests/job_graph.rs reads them, and manifests already written hold them), so the header
//! translates.

/// A dtype name: tch's Kind names as the spec's (`Float` → `float32`); a spec name as it is.
pub fn dtype_name(recorded: &str) -> String {
    match recorded {
        "Float" => "float32".into(),
        "Double" => "float64".into(),
        "Half" => "float16".into(),
        "BFloat16" => "bfloat16".into(),
        other => other.to_lowercase(),
    }
}

/// A device name, or a list of them: tch's Debug names as the spec's (`Cpu` → `cpu`,
/// `Cuda(1)` → `cuda:1`, `[Cpu, Cpu]` → `cpu, cpu`); a spec name as it is.
pub fn device_name(recorded: &str) -> String {
    let list = recorded.trim().trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(|d| one_device(d.trim())).collect::<Vec<_>>().join(", ")
}

fn one_device(d: &str) -> String {
    match d.strip_prefix("Cuda(").and_then(|n| n.strip_suffix(')')) {
        Some(n) => format!("cuda:{n}"),
        None => d.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tch_debug_names_read_as_the_spec_writes_them() {
        assert_eq!(dtype_name("Float"), "float32");
        assert_eq!(dtype_name("BFloat16"), "bfloat16");
        assert_eq!(dtype_name("Half"), "float16");
        assert_eq!(device_name("Cpu"), "cpu");
        assert_eq!(device_name("Cuda(0)"), "cuda:0");
        assert_eq!(device_name("[Cpu, Cuda(1)]"), "cpu, cuda:1");
        assert_eq!(device_name("Mps"), "mps");
    }

    #[test]
    fn spec_names_are_kept() {
        assert_eq!(dtype_name("float32"), "float32");
        assert_eq!(dtype_name("bf16"), "bf16");
        assert_eq!(device_name("cuda:1"), "cuda:1");
        assert_eq!(device_name("cpu"), "cpu");
    }
}
