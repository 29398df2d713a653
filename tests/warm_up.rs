//! The device warm-up's miniature (src/engine/warm.rs) is the real model cut to one block: for
//! every family fixture, processed and not, it has the real model's hook points and its weights
//! (which norms are folded away, which biases and gates exist), each of the same shape and dtype,
//! at layer 0 and outside the blocks, so its forward takes the same branches and kernels; and it
//! runs forward and backward.
//! On the CPU here; on a GPU the same code runs beside the load.
mod common;

use common::test_fixtures;

use tch::{Kind, Tensor};
use tl_run::engine::warm::{miniature, warm_up, WarmUp};
use tl_run::model::config::Processing;
use tl_run::model::hook_point::HookPoint;
use tl_run::{LoadOptions, Model};

/// Weight names with shape and dtype, at layer 0 and outside the blocks.
fn first_block_weights(m: &Model) -> Vec<String> {
    m.weights
        .named()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("blocks.") || n.starts_with("blocks.0."))
        .map(|(n, t)| format!("{n} {:?} {:?}", t.size(), t.kind()))
        .collect()
}

/// Hook names at layer 0 and outside the blocks.
fn first_block_points(m: &Model) -> Vec<String> {
    m.hook_points()
        .into_iter()
        .filter(|p| !matches!(p, HookPoint::Block(l, _) if *l > 0))
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn miniature_has_the_first_block_of_every_family_and_runs_forward_and_backward() {
    for name in &test_fixtures() {
        for processing in [Processing::TRANSFORMER_LENS, Processing::NONE] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let opts = LoadOptions { processing, kind, ..LoadOptions::default() };
                let real =
                    Model::load(common::fixture(name).to_str().expect("utf-8 path"), &opts).expect("fixture loads");
                let mini = miniature(&real.cfg, &opts).expect("miniature builds");
                assert_eq!(first_block_points(&mini), first_block_points(&real), "{name} {processing:?} {kind:?}");
                assert_eq!(first_block_weights(&mini), first_block_weights(&real), "{name} {processing:?} {kind:?}");
                assert_eq!(mini.cfg.n_layers, 1);
                let tokens = Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3]).view([2, 3]);
                for backward in [false, true] {
                    warm_up(&real.cfg, &opts, WarmUp { tokens: tokens.shallow_clone(), mask: None, backward })
                        .unwrap_or_else(|e| panic!("{name} {processing:?} {kind:?} backward={backward}: {e}"));
                }
            }
        }
    }
}
