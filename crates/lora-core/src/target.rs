//! Targeting and applying: PEFT's `check_target_module_exists` and `inject_adapter`, for any model
//! that lists its [`LoraLinear`] layers.

use std::fmt;

use burn::module::Module;
use burn::tensor::backend::Backend;
use regex::Regex;

use crate::config::{LayerSelector, LoraConfig, ModuleSelector};
use crate::error::LoraError;
use crate::linear::LoraLinear;
use crate::modules::{is_module_to_save, saved_shapes, unfreeze_saved};
use crate::params::param_count;
use crate::tokens::LoraEmbedding;

/// Whether the parameter at `param_path` belongs to the module `modules_to_save` entry `name`.
fn is_module_to_save_name(name: &str, param_path: &str) -> bool {
    crate::params::module_of(param_path).ends_with(name)
}

/// A model whose linear layers can carry adapters. Implemented by the model crate (a few lines:
/// list each `LoraLinear` with its module path); nothing else is needed to use this crate.
pub trait LoraModel<B: Backend>: Module<B> {
    /// Every adaptable linear layer with its module path (`model.layers.0.self_attn.q_proj`), in
    /// the order PyTorch's `named_modules` would list them.
    fn lora_linears(&mut self) -> Vec<(String, &mut LoraLinear<B>)>;

    /// Path of the output head, which `target_modules = "all-linear"` leaves out (PEFT excludes the
    /// output embeddings). `None` when the model has no separate head module.
    fn output_head(&self) -> Option<String> {
        None
    }

    /// Every token embedding that can carry trained rows ([`LoraEmbedding`]), with its module
    /// path, the input embedding first (`trainable_token_indices`). None by default.
    fn lora_embeddings(&mut self) -> Vec<(String, &mut LoraEmbedding<B>)> {
        Vec::new()
    }
}

/// PEFT's `print_trainable_parameters` numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// Elements of the adapter parameters (`lora_A`, `lora_B`, biases, magnitudes) and of the
    /// `modules_to_save` copies.
    pub trainable: usize,
    /// Elements of every parameter, base and adapter (and, as PEFT counts them, the
    /// `modules_to_save` copies beside their originals).
    pub all: usize,
    /// The adapted module paths, in model order.
    pub targeted: Vec<String>,
}

impl fmt::Display for LoraReport {
    /// Exactly PEFT's line: `trainable params: 20,185,088 || all params: 7,635,801,600 || trainable%: 0.2643`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            100.0 * self.trainable as f64 / self.all.max(1) as f64
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl LoraReport {
    /// Counts a model's parameters (without materializing lazy ones).
    pub fn of<B: Backend, M: Module<B>>(model: &M, targeted: Vec<String>) -> Self {
        let (trainable, all) = param_count(model);
        Self {
            trainable,
            all,
            targeted,
        }
    }
}

fn full_match(pattern: &str, text: &str) -> bool {
    Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(text))
}

fn selector_matches(sel: &ModuleSelector, key: &str) -> bool {
    match sel {
        ModuleSelector::Regex(p) => full_match(p, key),
        ModuleSelector::List(names) => names
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}"))),
    }
}

/// Whether PEFT would put an adapter on the module at `key` (`check_target_module_exists`).
pub fn is_targeted(cfg: &LoraConfig, key: &str, output_head: Option<&str>) -> bool {
    if let Some(ex) = &cfg.exclude_modules {
        if selector_matches(ex, key) {
            return false;
        }
    }
    let Some(target) = &cfg.target_modules else {
        return false;
    };
    match target {
        // "all-linear": every linear layer except the output head.
        ModuleSelector::Regex(s) if s == "all-linear" => Some(key) != output_head,
        ModuleSelector::Regex(p) => full_match(p, key),
        ModuleSelector::List(names) => {
            if names.iter().any(|t| t == key) {
                return true;
            }
            if !names.iter().any(|t| key.ends_with(&format!(".{t}"))) {
                return false;
            }
            let Some(layers) = &cfg.layers_to_transform else {
                return true;
            };
            // The layer index: `<anything>.<list name>.<index>.` as PEFT extracts it.
            let patterns: Vec<String> = match &cfg.layers_pattern {
                None => vec![r"[^.]*".into()],
                Some(ModuleSelector::Regex(p)) => vec![p.clone()],
                Some(ModuleSelector::List(v)) if v.is_empty() => vec![r"[^.]*".into()],
                Some(ModuleSelector::List(v)) => v.clone(),
            };
            let index = patterns.iter().find_map(|p| {
                let re = Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).ok()?;
                re.captures(key)?.get(1)?.as_str().parse::<usize>().ok()
            });
            match (index, layers) {
                (None, _) => false,
                (Some(i), LayerSelector::One(l)) => i == *l,
                (Some(i), LayerSelector::Many(ls)) => ls.is_empty() || ls.contains(&i),
            }
        }
    }
}

/// Applies `cfg` to `model` in one call (PEFT `get_peft_model`): freezes every base parameter,
/// attaches a fresh adapter to each targeted linear, and reports the parameter counts.
///
/// Adapters are drawn from the backend's RNG in model order, so seeding the backend first
/// (`B::seed(&device, seed)`) makes the initialization reproducible.
pub fn apply_lora<B: Backend, M: LoraModel<B>>(
    model: M,
    cfg: &LoraConfig,
) -> Result<(M, LoraReport), LoraError> {
    cfg.validate()?;
    let mut model = freeze(model);
    let head = model.output_head();
    let mut available = Vec::new();
    let mut targeted = Vec::new();
    for (path, linear) in model.lora_linears() {
        if is_targeted(cfg, &path, head.as_deref()) {
            let r = cfg.rank_for(&path);
            linear.attach_adapter(
                &path,
                r,
                cfg.scaling_for(&path),
                cfg.lora_dropout,
                &cfg.init_lora_weights,
            );
            linear.init_from_base(&path, &cfg.init_lora_weights)?;
            if cfg.lora_bias() {
                linear.add_lora_bias(&path);
            }
            if cfg.use_dora {
                linear.add_dora(&path);
            }
            targeted.push(path.clone());
        }
        available.push(path);
    }
    if targeted.is_empty() {
        return Err(LoraError::NoTarget {
            targets: serde_json::to_string(&cfg.target_modules).unwrap_or_default(),
            available: summarize(&available),
        });
    }
    if let Some(both) = targeted.iter().find(|p| is_module_to_save(cfg, p)) {
        return Err(LoraError::InvalidConfig {
            path: None,
            reason: format!(
                "`{both}` is both a LoRA target and in `modules_to_save`: train it one way, \
                 remove it from `target_modules` or from `modules_to_save`"
            ),
        });
    }
    attach_tokens(&mut model, cfg)?;
    let model = unfreeze_saved(model, cfg);
    let saved = saved_shapes(&model, cfg);
    if let Some(names) = cfg.modules_to_save.as_ref().filter(|n| !n.is_empty()) {
        for name in names {
            if !saved.iter().any(|(p, _)| is_module_to_save_name(name, p)) {
                let tied = if name.ends_with("lm_head") && head.is_none() {
                    " (this model ties its output head to `embed_tokens`: it has no separate \
                     `lm_head`; PEFT would untie it, which this crate does not)"
                } else {
                    ""
                };
                return Err(LoraError::InvalidConfig {
                    path: None,
                    reason: format!(
                        "`modules_to_save` names {name:?}, which matches no module of the model{tied}; \
                         use module names such as \"lm_head\" or \"embed_tokens\""
                    ),
                });
            }
        }
    }
    let mut report = LoraReport::of(&model, targeted);
    // PEFT trains a copy of each saved module and keeps the original: both are counted.
    let copies: usize = saved.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    report.trainable += copies;
    report.all += copies;
    Ok((model, report))
}

/// `trainable_token_indices`: trained rows on the embeddings it names (a list: the input
/// embedding; a map: embeddings whose path ends with the name).
fn attach_tokens<B: Backend, M: LoraModel<B>>(
    model: &mut M,
    cfg: &LoraConfig,
) -> Result<(), LoraError> {
    let wanted = cfg.trainable_token_indices()?;
    if wanted.is_empty() {
        return Ok(());
    }
    let mut embeddings = model.lora_embeddings();
    for (name, ids) in wanted {
        let found = embeddings
            .iter_mut()
            .enumerate()
            .find(|(i, (path, _))| match &name {
                None => *i == 0,
                Some(n) => path.ends_with(n.as_str()),
            });
        let Some((_, (path, emb))) = found else {
            return Err(LoraError::InvalidConfig {
                path: None,
                reason: format!(
                    "`trainable_token_indices` names {}, which is not an embedding of the model (it has {:?})",
                    name.as_deref().unwrap_or("the input embedding"),
                    embeddings.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>()
                ),
            });
        };
        emb.attach_tokens(path, &ids)?;
    }
    Ok(())
}

/// Marks every parameter as not requiring gradients without materializing lazy ones
/// (`Module::no_grad` maps tensor values, which would allocate every lazy parameter).
fn freeze<B: Backend, M: Module<B>>(model: M) -> M {
    struct Freeze;
    impl<B: Backend> burn::module::ModuleMapper<B> for Freeze {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
            param.set_require_grad(false)
        }
    }
    model.map(&mut Freeze)
}

/// Module paths, shortened: the distinct names (`q_proj`, ...) plus a few full paths.
fn summarize(paths: &[String]) -> String {
    let mut names: Vec<&str> = paths
        .iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p))
        .collect();
    names.sort();
    names.dedup();
    let examples: Vec<&str> = paths.iter().take(3).map(String::as_str).collect();
    format!("names {names:?} (e.g. {})", examples.join(", "))
}

/// Merges every attached adapter into its base weight (PEFT `merge_adapter`); trained token rows
/// are written into their embedding for good (PEFT `merge_and_unload`; not undone by
/// [`unmerge_all`]).
pub fn merge_all<B: Backend, M: LoraModel<B>>(model: &mut M) -> Result<usize, LoraError> {
    let mut n = 0;
    for (_, e) in model.lora_embeddings() {
        n += usize::from(e.merge());
    }
    for (path, l) in model.lora_linears() {
        if l.has_adapter() && !l.merged {
            l.merge(&path)?;
            n += 1;
        }
    }
    Ok(n)
}

/// For inference only (chat, serving): every DoRA layer computes its `m / ‖W + s·B·A‖` once
/// ([`LoraLinear::cache_dora_scale`]) instead of on every forward. Returns the layers cached.
pub fn cache_dora_scales<B: Backend, M: LoraModel<B>>(model: &mut M) -> usize {
    let mut n = 0;
    for (_, l) in model.lora_linears() {
        if l.is_dora() && !l.merged {
            l.cache_dora_scale();
            n += 1;
        }
    }
    n
}

/// Unmerges every merged adapter (PEFT `unmerge_adapter`).
pub fn unmerge_all<B: Backend, M: LoraModel<B>>(model: &mut M) -> Result<usize, LoraError> {
    let mut n = 0;
    for (path, l) in model.lora_linears() {
        if l.merged {
            l.unmerge(&path)?;
            n += 1;
        }
    }
    Ok(n)
}
