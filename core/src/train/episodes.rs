//! Plays multi-turn episodes for the offline loop: the model answers, the environment replies,
//! and each turn's prompt is the conversation so far with the earlier answers spliced in as
//! sampled, so an episode is one token sequence whose sampled tokens are marked.

use super::environment::Environment;
use super::run::RunError;
use crate::engine::{Engine, GeneratedToken, GenerationRequest, SamplingParams};
use crate::model::Transformer;
use crate::tokenizer::chat::{ChatMessage, ChatTemplate};
use crate::tokenizer::splice::{end_text, spliced_prompt, SplicedTurn};
use crate::tokenizer::Tokenizer;

/// A finished episode as one training sequence: the tokens before its first sampled token are
/// the prompt, the rest up to its last sampled token the completion.
#[derive(Debug, Clone, Default)]
pub struct PlayedEpisode {
    /// Tokens before the first answer.
    pub prompt_ids: Vec<u32>,
    /// From the first answer's first token to the last answer's last one.
    pub completion_ids: Vec<u32>,
    /// Per completion token: sampled by the model (else context from the environment).
    pub sampled_mask: Vec<bool>,
    /// Per completion token: behaviour logprob (0 for context).
    pub logprobs: Vec<f32>,
    /// Per completion token: sampling entropy (0 for context).
    pub entropies: Vec<f32>,
    /// Per completion token: its text.
    pub pieces: Vec<String>,
    /// The environment's reward.
    pub reward: f32,
    /// The model's answers, one per turn.
    pub answers: Vec<String>,
}

/// One episode in progress.
struct Playing<'e> {
    messages: Vec<ChatMessage>,
    turns: Vec<SplicedTurn>,
    environment: Box<dyn Environment + 'e>,
    tokens: Vec<u32>,
    sampled: Vec<bool>,
    logprobs: Vec<f32>,
    entropies: Vec<f32>,
    pieces: Vec<String>,
    answers: Vec<String>,
    done: bool,
}

impl Playing<'_> {
    fn extend_context(&mut self, ids: &[u32], tokenizer: &Tokenizer) {
        self.tokens.extend_from_slice(ids);
        self.sampled.extend(std::iter::repeat_n(false, ids.len()));
        self.logprobs.extend(std::iter::repeat_n(0.0, ids.len()));
        self.entropies.extend(std::iter::repeat_n(0.0, ids.len()));
        self.pieces.extend(ids.iter().map(|&id| tokenizer.decode(&[id], false).unwrap_or_default()));
    }

    fn extend_sampled(&mut self, tokens: &[GeneratedToken]) {
        self.tokens.extend(tokens.iter().map(|t| t.id));
        self.sampled.extend(std::iter::repeat_n(true, tokens.len()));
        self.logprobs.extend(tokens.iter().map(|t| t.sampling_logprob));
        self.entropies.extend(tokens.iter().map(|t| t.entropy));
        self.pieces.extend(tokens.iter().map(|t| t.text.clone()));
    }

    fn finish(self) -> PlayedEpisode {
        let from = self.sampled.iter().position(|&s| s).unwrap_or(self.tokens.len());
        let to = self.sampled.iter().rposition(|&s| s).map_or(from, |i| i + 1);
        PlayedEpisode {
            prompt_ids: self.tokens[..from].to_vec(),
            completion_ids: self.tokens[from..to].to_vec(),
            sampled_mask: self.sampled[from..to].to_vec(),
            logprobs: self.logprobs[from..to].to_vec(),
            entropies: self.entropies[from..to].to_vec(),
            pieces: self.pieces[from..to].to_vec(),
            reward: self.environment.reward(),
            answers: self.answers,
        }
    }
}

/// What [`play`] needs besides the episodes.
pub struct Table<'a> {
    /// The model that answers.
    pub model: &'a Transformer,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The chat template conversations are rendered with.
    pub template: &'a ChatTemplate,
    /// Tokens per answer.
    pub max_new_tokens: usize,
    /// Answers per episode, at most.
    pub max_turns: usize,
}

/// Plays one episode per `(opening messages, environment)`, all turns batched together;
/// `sampling(episode, turn)` gives each answer's sampling parameters (its seed).
pub fn play<'e>(table: &Table<'_>, episodes: Vec<(Vec<ChatMessage>, Box<dyn Environment + 'e>)>, sampling: impl Fn(usize, usize) -> SamplingParams) -> Result<Vec<PlayedEpisode>, RunError> {
    let mut playing: Vec<Playing<'e>> = episodes
        .into_iter()
        .map(|(messages, environment)| Playing { messages, turns: Vec::new(), environment, tokens: Vec::new(), sampled: Vec::new(), logprobs: Vec::new(), entropies: Vec::new(), pieces: Vec::new(), answers: Vec::new(), done: false })
        .collect();
    for turn in 0..table.max_turns.max(1) {
        let active: Vec<usize> = (0..playing.len()).filter(|&i| !playing[i].done).collect();
        if active.is_empty() {
            break;
        }
        let mut requests = Vec::with_capacity(active.len());
        let mut asking = Vec::with_capacity(active.len());
        for &i in &active {
            let episode = &mut playing[i];
            let (prompt, _) = spliced_prompt(table.template, table.tokenizer, &episode.messages, None, episode.turns.clone())?;
            // An episode whose conversation has outgrown the model's context ends here; the
            // others go on.
            if prompt.len() + 1 >= table.model.max_positions() {
                tracing::warn!(turn, tokens = prompt.len(), "an episode outgrew the model's context; it ends here");
                episode.done = true;
                continue;
            }
            requests.push(GenerationRequest::new(prompt, sampling(i, turn), table.max_new_tokens, table.tokenizer));
            asking.push(i);
        }
        if requests.is_empty() {
            break;
        }
        let capacity = requests.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(1) + table.max_new_tokens + 1;
        let mut engine = Engine::new(table.model, table.tokenizer, requests.len().min(64), capacity);
        let generations = engine.generate(&requests)?;
        for ((&i, request), generation) in asking.iter().zip(&requests).zip(generations) {
            let episode = &mut playing[i];
            // The spliced prompt extends what the episode holds; anything else (a template that
            // drops old turns) would not be one sequence, so the episode ends there.
            if !request.prompt_ids.starts_with(&episode.tokens) {
                tracing::warn!(turn, "the chat template does not extend the episode's tokens; the episode ends early");
                episode.done = true;
                continue;
            }
            let context = request.prompt_ids[episode.tokens.len()..].to_vec();
            episode.extend_context(&context, table.tokenizer);
            episode.extend_sampled(&generation.tokens);
            let ids: Vec<u32> = generation.tokens.iter().map(|t| t.id).collect();
            episode.messages.push(ChatMessage::new("assistant", generation.text.clone()));
            episode.turns.push(SplicedTurn { message: episode.messages.len() - 1, end_text: end_text(table.tokenizer, &ids), token_ids: ids });
            episode.answers.push(generation.text.clone());
            match episode.environment.reply(turn, &generation.text) {
                Some(reply) => episode.messages.push(ChatMessage::new("user", reply)),
                None => episode.done = true,
            }
        }
    }
    Ok(playing.into_iter().map(Playing::finish).collect())
}
