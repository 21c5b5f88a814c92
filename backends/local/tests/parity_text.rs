//! Parity of the prompt path and the schedule with the reference pipeline, on every fixture case.

mod fixture;

use fixture::{Case, CASES};
use kleingate_local::schedule::Schedule;
use kleingate_local::tokenizer::PromptTokenizer;

#[test]
fn token_ids_and_masks_match_the_reference() {
    let tok = PromptTokenizer::load(&fixture::pipeline().join("tokenizer")).unwrap();
    for name in CASES.iter().filter(|c| **c != "vae_roundtrip") {
        let case = Case::load(name);
        let max_len = case.json["max_sequence_length"].as_u64().unwrap() as usize;
        let prompts: Vec<String> = match &case.json["prompt"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|p| p.as_str().unwrap().to_owned()).collect()
            }
            other => panic!("{other}"),
        };
        let ids = case.int_tensor("text.input_ids");
        let mask = case.int_tensor("text.attention_mask");
        for (b, p) in prompts.iter().enumerate() {
            assert_eq!(
                tok.template(p).unwrap(),
                case.json["templated_prompt"][b].as_str().unwrap(),
                "{name}"
            );
            let enc = tok.encode(p, max_len).unwrap();
            assert_eq!(
                enc.ids,
                ids[b * max_len..(b + 1) * max_len],
                "{name} prompt {b}"
            );
            assert_eq!(
                enc.mask,
                mask[b * max_len..(b + 1) * max_len],
                "{name} prompt {b}"
            );
            // The reference counts the tokens kept (after truncation, before padding).
            assert_eq!(
                enc.n_tokens.min(max_len) as u64,
                case.json["num_prompt_tokens_before_padding"][b]
                    .as_u64()
                    .unwrap()
            );
            assert_eq!(enc.truncated, case.json["truncated"][b].as_bool().unwrap());
        }
        if case.has("neg_text.input_ids") {
            let enc = tok.encode("", max_len).unwrap();
            assert_eq!(
                enc.ids,
                case.int_tensor("neg_text.input_ids")[..max_len],
                "{name} negative"
            );
            assert_eq!(
                enc.mask,
                case.int_tensor("neg_text.attention_mask")[..max_len],
                "{name} negative"
            );
        }
    }
}

#[test]
fn long_prompts_are_truncated_like_the_reference() {
    let tok = PromptTokenizer::load(&fixture::pipeline().join("tokenizer")).unwrap();
    let long = "a very long prompt about snow and foxes ".repeat(20);
    let enc = tok.encode(&long, 64).unwrap();
    assert!(enc.truncated && enc.n_tokens > 64);
    assert_eq!(enc.ids.len(), 64);
    assert!(
        enc.mask.iter().all(|m| *m == 1),
        "no padding once truncated"
    );
    // Truncation cuts the template tail too, as the reference does: the ids are a prefix of the
    // full encoding.
    let full = tok.encode(&long, 4096).unwrap();
    assert_eq!(enc.ids[..], full.ids[..64]);
}

#[test]
fn schedules_match_the_reference() {
    for name in CASES.iter().filter(|c| **c != "vae_roundtrip") {
        let case = Case::load(name);
        let steps = case.json["num_inference_steps"].as_u64().unwrap() as usize;
        let seq = case.json["image_seq_len"].as_u64().unwrap() as usize;
        let s = Schedule::new(steps, seq);
        let mu = case.json["mu"].as_f64().unwrap();
        assert!((s.mu - mu).abs() < 1e-12, "{name}: mu {} vs {mu}", s.mu);
        // Same float32 arithmetic as the reference: equal to the last bit.
        assert_eq!(s.sigmas, case.tensor("schedule.sigmas").0, "{name}");
        assert_eq!(s.timesteps, case.tensor("schedule.timesteps").0, "{name}");
    }
}

fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The text encoder against the reference: embeddings, the first decoder layer (RoPE, GQA, q/k
/// norms, causal + padding mask) and the stacked layer-9/18/27 embeddings, for a single prompt, a
/// batch of two (one of them truncated) and the empty negative prompt.
///
/// Tolerances (relative to the tensor's largest magnitude), f32 here vs the reference's f32 run:
/// the embedding lookup is a copy (exact); one layer ~1e-6 of rounding; 27 layers compound that to
/// ~1e-5, so 1e-4 leaves room for summation-order differences while any real bug (wrong RoPE
/// half, mask or head mapping) shows up at 1e-1 or more.
#[test]
fn text_embeddings_match_the_reference() {
    let device = burn::tensor::Device::flex();
    let layers = [9, 18, 27];
    let enc = kleingate_local::text_encoder::TextEncoder::load(
        &fixture::pipeline().join("text_encoder"),
        &layers,
        &device,
    )
    .unwrap();
    for (name, prefix) in [
        ("t2i_distilled", "text"),
        ("t2i_distilled_batch2", "text"),
        ("t2i_base_cfg", "neg_text"),
    ] {
        let case = Case::load(name);
        let (_, shape) = case.tensor(&format!("{prefix}.input_ids"));
        let (b, l) = (shape[0], shape[1]);
        let ids = case.int_tensor(&format!("{prefix}.input_ids"));
        let mask = case.int_tensor(&format!("{prefix}.attention_mask"));
        let states = enc.hidden_states(&ids, &mask, b, l).unwrap();
        assert_eq!(
            values(states[0].clone()),
            case.tensor(&format!("{prefix}.hidden_state_0")).0,
            "{name}: embeddings"
        );
        fixture::assert_close(
            &format!("{name} {prefix} layer 1"),
            &values(states[1].clone()),
            &case.tensor(&format!("{prefix}.hidden_state_1")).0,
            1e-5,
        );
        let embeds = enc.encode(&ids, &mask, b, l, &layers).unwrap();
        let (expected, eshape) = case.tensor(&format!("{prefix}.prompt_embeds"));
        assert_eq!(embeds.dims().to_vec(), eshape);
        fixture::assert_close(
            &format!("{name} {prefix} prompt_embeds"),
            &values(embeds),
            &expected,
            1e-4,
        );
    }
}
