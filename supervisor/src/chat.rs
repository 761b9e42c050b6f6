//! Chat templates: the model's own Jinja template from its GGUF (`tokenizer.chat_template`),
//! or the spec's override, rendered with minijinja the way Hugging Face's transformers does
//! (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`). Models without a
//! template get ChatML.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// ChatML, for models that carry no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A rendered prompt and how much of it is the reusable system prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub prompt: String,
    /// Bytes of `prompt` that the leading system message(s) render to, when the template
    /// renders them as a prefix of the whole conversation.
    pub prefix_bytes: Option<usize>,
}

fn env() -> Environment<'static> {
    let mut env = Environment::new();
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String { jiff::Zoned::now().strftime(&fmt).to_string() });
    env
}

fn render_one(template: &str, messages: &[Message], bos: &str, eos: &str, gen_prompt: bool) -> Result<String, Error> {
    let env = env();
    let tmpl = env.template_from_str(template)?;
    tmpl.render(context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => gen_prompt,
        bos_token => bos,
        eos_token => eos,
    })
}

/// Renders `messages` for generation. Errors name the template's complaint (a template may
/// refuse, e.g. roles that do not alternate).
pub fn render(template: Option<&str>, messages: &[Message], bos: &str, eos: &str) -> Result<Rendered, String> {
    let template = template.unwrap_or(CHATML);
    let prompt =
        render_one(template, messages, bos, eos, true).map_err(|e| format!("the chat template failed: {e:#}"))?;
    let system: Vec<Message> = messages.iter().take_while(|m| m.role == "system").cloned().collect();
    let prefix_bytes = if system.is_empty() || system.len() == messages.len() {
        None
    } else {
        render_one(template, &system, bos, eos, false)
            .ok()
            .filter(|p| !p.is_empty() && prompt.starts_with(p.as_str()))
            .map(|p| p.len())
    };
    Ok(Rendered { prompt, prefix_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn chatml_renders_with_a_system_prefix() {
        let r = render(None, &[m("system", "Be brief."), m("user", "Hi")], "", "").unwrap();
        assert_eq!(
            r.prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(&r.prompt[..r.prefix_bytes.unwrap()], "<|im_start|>system\nBe brief.<|im_end|>\n");
    }

    #[test]
    fn hf_style_templates_work() {
        let t = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% endfor %}";
        let r = render(Some(t), &[m("user", " Hi ")], "<s>", "</s>").unwrap();
        assert_eq!(r.prompt, "<s>[INST] Hi [/INST]");
        let e = render(Some(t), &[m("system", "x"), m("user", "y")], "<s>", "</s>").unwrap_err();
        assert!(e.contains("no system role"), "{e}");
    }
}
