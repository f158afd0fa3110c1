//! `lora-core` is generic: a model of our own (not Qwen2) gets adapters by name patterns, trains
//! with AdamW, and only the adapters change.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use lora_core::{
    apply_lora, load_adapter, save_adapter, LoraConfig, LoraError, LoraLinear, LoraModel,
    ModuleSelector, ADAPTER_CONFIG,
};

type Ad = Autodiff<Flex>;

/// A small regression network: `head(relu(fc2(relu(fc1(x)))))`.
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
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.head
            .forward(relu(self.fc2.forward(relu(self.fc1.forward(x)))))
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

#[test]
fn own_model_trains_only_its_adapters() {
    let dev = Default::default();
    Ad::seed(&dev, 7);
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(ModuleSelector::Regex("fc[12]".into())),
        ..LoraConfig::default()
    };
    let (mut model, report) = apply_lora(Mlp::<Ad>::new(&dev), &cfg).unwrap();
    assert_eq!(report.targeted, ["fc1", "fc2"]);
    assert_eq!(report.trainable, 4 * (16 + 32) + 4 * (32 + 32));
    assert!(model.head.lora_A.is_none());

    let base_before = (
        values(model.fc1.weight.val()),
        values(model.head.weight.val()),
    );
    let x = Tensor::<Ad, 2>::random([64, 16], Distribution::Normal(0.0, 1.0), &dev);
    let y = Tensor::<Ad, 2>::random([64, 4], Distribution::Normal(0.0, 1.0), &dev);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<Ad, Mlp<Ad>>();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        losses.push(values(loss.clone())[0]);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(
            grads.len(),
            4,
            "only the four adapter tensors get gradients"
        );
        model = optim.step(1e-2, model, grads);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.8 * first, "loss did not fall: {first} -> {last}");
    assert_eq!(
        values(model.fc1.weight.val()),
        base_before.0,
        "frozen base changed"
    );
    assert_eq!(
        values(model.head.weight.val()),
        base_before.1,
        "frozen head changed"
    );
    let b = values(model.fc2.lora_B.as_ref().unwrap().weight.val());
    assert!(
        b.iter().any(|v| *v != 0.0),
        "lora_B moved away from its zero init"
    );
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
