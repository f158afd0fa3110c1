//! `lora-core` is generic: a model of our own (not Qwen2) gets adapters by name patterns (its
//! training is the crate README's doctest), and Burn's own linear layer converts into ours.

use burn::backend::Flex;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use lora_core::{
    apply_lora, load_adapter, save_adapter, LoraConfig, LoraError, LoraLinear, LoraModel,
    ModuleSelector, ADAPTER_CONFIG,
};

/// The README's small network: three linear layers, the last one the output head.
#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    fc1: LoraLinear<B>,
    fc2: LoraLinear<B>,
    head: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            fc1: LoraLinear::new(16, 32, true, 0.3, device),
            fc2: LoraLinear::new(32, 32, true, 0.3, device),
            head: LoraLinear::new(32, 4, false, 0.3, device),
        }
    }
}

impl<B: Backend> LoraModel<B> for Mlp<B> {
    fn lora_linears(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        vec![
            ("fc1".into(), &mut self.fc1),
            ("fc2".into(), &mut self.fc2),
            ("head".into(), &mut self.head),
        ]
    }
    fn output_head(&self) -> Option<String> {
        Some("head".into())
    }
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Burn's own `nn::Linear` (weight `[in, out]`, or a transposed view with `LinearLayout::Col`)
/// converts into a `LoraLinear` that computes the same map, with the same parameter id.
#[test]
fn burn_linear_converts_to_the_same_map() {
    use burn::nn::{LinearConfig, LinearLayout};
    let dev = Default::default();
    for layout in [LinearLayout::Row, LinearLayout::Col] {
        let linear = LinearConfig::new(6, 5)
            .with_layout(layout)
            .init::<Flex>(&dev);
        let x = Tensor::<Flex, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &dev);
        let want = values(linear.forward(x.clone()));
        let id = linear.weight.id;
        let lora = LoraLinear::from(linear);
        assert_eq!(lora.shape(), [5, 6]);
        assert_eq!(lora.weight.id, id);
        let got = values(lora.forward(x));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-6, "{layout:?}: max error {err}");
    }
}

/// Found while writing the `adapter_config` fuzz target's load mode: an `adapter_config.json`
/// claiming a huge rank made `load_adapter` allocate the adapters it claims (here 2^40 x 16 floats)
/// before looking at the file, aborting the process. The shapes are now checked against the file
/// first.
#[test]
fn load_adapter_checks_the_claimed_rank_before_allocating() {
    let dev = Default::default();
    let cfg = LoraConfig {
        r: 2,
        target_modules: Some(ModuleSelector::List(vec!["fc1".into()])),
        ..LoraConfig::default()
    };
    let (model, _) = apply_lora(Mlp::<Flex>::new(&dev), &cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("lora-core-claimed-rank-{}", std::process::id()));
    save_adapter(&model, &cfg, &dir).unwrap();
    for text in [
        r#"{"r": 1099511627776, "target_modules": ["fc1"]}"#,
        r#"{"r": 2, "rank_pattern": {"fc1": 1099511627776}, "target_modules": ["fc1"]}"#,
    ] {
        std::fs::write(dir.join(ADAPTER_CONFIG), text).unwrap();
        let err = load_adapter(Mlp::<Flex>::new(&dev), &dir).unwrap_err();
        assert!(
            matches!(&err, LoraError::ShapeMismatch { key, found, .. }
                if key == "base_model.model.fc1.lora_A.weight" && found == &[2, 16]),
            "{text}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
