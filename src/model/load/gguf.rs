//! GGUF files (llama.cpp): every tensor dequantized to the asked dtype, renamed to the Hugging
//! Face layout, with llama.cpp's q/k row permutation undone (Llama family), Gemma's norm
//! weights given back their `(1 + w)` form, and tied embeddings handled.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::finish_tensor;
use crate::model::{CausalLm, Family, LoadOptions, Loaded, ModelConfig};
use crate::tokenize::Tokenizer;
use crate::{Error, Result};

/// Reads a GGUF file's header (metadata and tensor table).
pub fn read_gguf_content(path: &Path) -> Result<gguf_file::Content> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    gguf_file::Content::read(&mut reader).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("not a valid GGUF file: {e}"),
    })
}

/// Loads a GGUF model, dequantized.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let content = read_gguf_content(path)?;
    let config = ModelConfig::from_gguf(&content, path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);

    let family = config.family;
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads;
    let model = CausalLm::build(config, opts, |name, shape| {
        let gguf_name = gguf_name(name, family).ok_or_else(|| Error::MissingTensor {
            name: format!("{name} (no GGUF equivalent)"),
            path: path.to_path_buf(),
        })?;
        if !content.tensor_infos.contains_key(&gguf_name) {
            return Err(Error::MissingTensor {
                name: format!("{gguf_name} (for {name})"),
                path: path.to_path_buf(),
            });
        }
        let qtensor = content
            .tensor(&mut reader, &gguf_name, &Device::Cpu)
            .map_err(|e| Error::Parse {
                path: path.to_path_buf(),
                line: None,
                msg: format!("tensor `{gguf_name}`: {e}"),
            })?;
        let mut tensor = qtensor.dequantize(&Device::Cpu)?;

        // llama.cpp's converter interleaves the two rotary halves of each head's rows for
        // Llama-family q/k projections; transformers undoes it, and so do we.
        if family == Family::Llama && name.ends_with("q_proj.weight") {
            tensor = unpermute_rows(&tensor, heads, name, path)?;
        } else if family == Family::Llama && name.ends_with("k_proj.weight") {
            tensor = unpermute_rows(&tensor, kv_heads, name, path)?;
        }
        // llama.cpp's converter folds Gemma's `1 + w` into its norm weights; our Gemma
        // norms, as transformers', add the 1 themselves.
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        if gemma && name.ends_with("norm.weight") {
            tensor = tensor.affine(1.0, -1.0)?;
        }
        finish_tensor(tensor, name, path, shape, opts)
    })?;

    let tokenizer = if content.metadata.contains_key("tokenizer.ggml.model") {
        Some(Tokenizer::from_gguf(&content)?)
    } else {
        None
    };
    Ok(Loaded { model, tokenizer })
}

/// The GGUF tensor name of a Hugging Face parameter name (llama.cpp's names; Gemma's four
/// norms per block map differently from Llama's two).
fn gguf_name(hf: &str, family: Family) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => match family {
            Family::Gemma2 | Family::Gemma3 => "post_attention_norm",
            Family::Llama | Family::Qwen2 => "ffn_norm",
        },
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// Undoes llama.cpp's permutation of a `[heads * head_dim, in]` projection: within each head,
/// rows are stored as (half, pair) and HF expects (pair, half).
fn unpermute_rows(w: &Tensor, heads: usize, name: &str, path: &Path) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::ShapeMismatch {
            name: format!(
                "{name} in {} (rows must split into {heads} heads)",
                path.display()
            ),
            expected: vec![rows - rows % (2 * heads.max(1)), cols],
            got: vec![rows, cols],
        });
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}
