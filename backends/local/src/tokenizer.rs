//! Prompt -> token ids, exactly as the reference pipeline does it: the checkpoint's own chat
//! template (Qwen3, rendered with `add_generation_prompt=True, enable_thinking=False`), byte-level
//! BPE from `tokenizer/tokenizer.json` without added special tokens, truncation to the maximum
//! length and right padding with the pad token, plus the attention mask.

use std::path::Path;

use minijinja::{context, Environment};
use serde_json::Value;

use crate::error::EngineError;

pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    env: Environment<'static>,
    pad_id: u32,
}

/// One tokenised prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Exactly `max_len` ids, right-padded.
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<u32>,
    /// Tokens of the templated prompt before truncation.
    pub n_tokens: usize,
    pub truncated: bool,
}

fn token_text(v: &Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
}

impl PromptTokenizer {
    /// Load from a diffusers `tokenizer/` folder.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let tj = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| EngineError::io(&tj, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| EngineError::io(&cfg_path, e))?,
            Err(_) => Value::Null,
        };
        // transformers 5 saves the template as its own file; 4.x keeps it in tokenizer_config.
        let tmpl_path = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&tmpl_path) {
            Ok(t) => t,
            Err(_) => cfg
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "no chat template: neither {} nor `chat_template` in {}",
                        tmpl_path.display(),
                        cfg_path.display()
                    ))
                })?,
        };
        let pad = cfg
            .get("pad_token")
            .and_then(token_text)
            .unwrap_or("<|endoftext|>");
        let pad_id = tokenizer.token_to_id(pad).ok_or_else(|| {
            EngineError::Tokenizer(format!("pad token `{pad}` is not in the vocabulary"))
        })?;

        // transformers renders chat templates with trim_blocks and lstrip_blocks on, and Python
        // string methods available; mirror both.
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", template)
            .map_err(|e| EngineError::Tokenizer(format!("chat template does not parse: {e}")))?;
        Ok(PromptTokenizer {
            tokenizer,
            env,
            pad_id,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The prompt as the text encoder sees it, before tokenisation.
    pub fn template(&self, prompt: &str) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        tmpl.render(context! {
            messages => vec![context! { role => "user", content => prompt }],
            add_generation_prompt => true,
            enable_thinking => false,
        })
        .map_err(|e| EngineError::Tokenizer(format!("rendering the chat template failed: {e}")))
    }

    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Encoded, EngineError> {
        let text = self.template(prompt)?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let n_tokens = ids.len();
        let truncated = n_tokens > max_len;
        ids.truncate(max_len);
        let real = ids.len();
        ids.resize(max_len, self.pad_id);
        let mut mask = vec![1u32; real];
        mask.resize(max_len, 0);
        Ok(Encoded {
            ids,
            mask,
            n_tokens,
            truncated,
        })
    }
}
