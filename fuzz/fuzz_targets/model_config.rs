//! qwen2's `Qwen2Config::from_json_str` (parse + `validate()`) on arbitrary bytes, then every
//! derived size a caller reads from an accepted config. Must give `Ok` or a `Qwen2Error`, never a
//! panic; an accepted config must serialize and parse back as accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen2::Qwen2Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Qwen2Config::from_json_str(&text) {
        Ok(cfg) => {
            assert!(cfg.head_dim() >= 2 && cfg.head_dim() % 2 == 0);
            assert!(cfg.num_key_value_groups() >= 1);
            assert!(cfg.rope_theta() > 0.0);
            let _ = cfg.storage_dtype();
            let _ = cfg.eos_token_id.as_ref().map(|ids| ids.to_vec());
            let _ = cfg.num_parameters();
            let again = serde_json::to_string(&cfg).expect("serialize");
            if let Err(e) = Qwen2Config::from_json_str(&again) {
                panic!("accepted config does not parse back: {e}\n{again}");
            }
        }
        Err(e) => drop(e.to_string()),
    }
});
