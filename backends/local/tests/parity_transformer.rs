//! One transformer forward against the reference (step 0 of each case), block by block.

mod fixture;

use burn::tensor::{Device, Tensor, TensorData};
use fixture::Case;
use kleingate_local::transformer::Transformer;

fn tensor3(case: &Case, name: &str, device: &Device) -> Tensor<3> {
    let (v, s) = case.tensor(name);
    Tensor::from_data(TensorData::new(v, [s[0], s[1], s[2]]), device)
}

fn ids(case: &Case, name: &str) -> Vec<[i64; 4]> {
    let (v, s) = case.tensor(name);
    // Position ids are the same for every batch element; the reference uses element 0's.
    v[..s[1] * 4]
        .chunks_exact(4)
        .map(|c| [c[0] as i64, c[1] as i64, c[2] as i64, c[3] as i64])
        .collect()
}

/// Tolerances relative to each tensor's largest magnitude. The reference ran in f32 too; single
/// matmuls agree to ~1e-6, the block chain accumulates, so the intermediate values are held to
/// 1e-4 and the output to 2e-4. A wrong RoPE pairing, modulation chunk order or stream order
/// shows up at >1e-1.
#[test]
fn transformer_forward_matches_the_reference() {
    let device = Device::flex();
    let model = Transformer::load(&fixture::pipeline().join("transformer"), &device).unwrap();
    for name in fixture::GENERATION_CASES {
        let case = Case::load(name);
        let mut x = tensor3(&case, "latents.packed", &device);
        let mut img_ids = ids(&case, "latents.ids");
        if case.has("ref.tokens") {
            let refs = tensor3(&case, "ref.tokens", &device);
            let b = x.dims()[0];
            let [_, nr, c] = refs.dims();
            x = Tensor::cat(vec![x, refs.expand([b, nr, c])], 1);
            img_ids.extend(ids(&case, "ref.ids"));
        }
        let txt_ids = ids(&case, "text.text_ids");
        let t = case.tensor("step0.cond.in.timestep").0[0] * 1000.0;
        // (name, values, shape) of every intermediate value the forward hands out.
        let mut trace: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
        let out = model
            .forward_traced(
                x.clone(),
                tensor3(&case, "text.prompt_embeds", &device),
                t,
                &txt_ids,
                &img_ids,
                &mut |name, value| trace.push((name.to_owned(), value.to_f32_vec(), value.dims())),
            )
            .unwrap();
        for (tname, values, dims) in &trace {
            let key = format!("step0.cond.{tname}");
            if case.has(&key) {
                let (expected, shape) = case.tensor(&key);
                assert_eq!(dims, &shape, "{name} {key}");
                fixture::assert_close(&format!("{name} {key}"), values, &expected, 1e-4);
            }
        }
        let got = out.into_data().try_to_vec::<f32>().unwrap();
        fixture::assert_close(
            &format!("{name} step0.cond.output"),
            &got,
            &case.tensor("step0.cond.output").0,
            2e-4,
        );
        if case.has("step0.uncond.output") {
            let out = model
                .forward(
                    x,
                    tensor3(&case, "neg_text.prompt_embeds", &device),
                    t,
                    &txt_ids,
                    &img_ids,
                )
                .unwrap();
            let got = out.into_data().try_to_vec::<f32>().unwrap();
            fixture::assert_close(
                &format!("{name} step0.uncond.output"),
                &got,
                &case.tensor("step0.uncond.output").0,
                2e-4,
            );
        }
    }
}

#[test]
fn mismatched_inputs_are_errors_not_panics() {
    let device = Device::flex();
    let model = Transformer::load(&fixture::pipeline().join("transformer"), &device).unwrap();
    // Shapes from the config, so the test holds for any fixture pipeline.
    let (cin, cj) = (model.config.in_channels, model.config.joint_attention_dim);
    let x = Tensor::<3>::zeros([1, 4, cin + 1], &device);
    let ctx = Tensor::<3>::zeros([1, 2, cj], &device);
    let e = model
        .forward(x, ctx, 1000.0, &[[0; 4]; 2], &[[0; 4]; 4])
        .unwrap_err();
    assert!(e.to_string().contains(&format!("in_channels {cin}")), "{e}");
}
