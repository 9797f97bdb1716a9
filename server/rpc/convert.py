"""Protobuf <-> internal objects for the ChatService."""

from __future__ import annotations

from bitserve.engine.output_processor import CompletionDelta
from bitserve.engine.request import FinishReason, Timings
from bitserve.frontend import ModelInfo
from bitserve.sampling_params import SamplingParams
from bitserve.v1 import chat_pb2 as pb

_OPTIONAL_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "n", "skip_special_tokens",
    "include_stop_str_in_output",
)

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def sampling_params(opts: pb.SamplingOptions, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from the request; unset fields take the server defaults. ValueError names a bad field."""
    values = {name: getattr(opts, name) for name in _OPTIONAL_FIELDS if opts.HasField(name)}
    values.setdefault("max_tokens", default_max_tokens)
    if opts.stop:
        values["stop"] = list(opts.stop)
    if opts.stop_token_ids:
        values["stop_token_ids"] = list(opts.stop_token_ids)
    if opts.logit_bias:
        values["logit_bias"] = dict(opts.logit_bias)
    # float32 on the wire: 0.9 arrives as 0.8999999762; keep the user's intent
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in values:
            values[name] = float(f"{values[name]:.7g}")
    return SamplingParams(**values)


def messages(request: pb.ChatRequest) -> list[dict]:
    out = []
    for m in request.messages:
        msg = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            msg["name"] = m.name
        out.append(msg)
    return out


def usage(delta: CompletionDelta) -> pb.Usage:
    u = pb.Usage(prompt_tokens=delta.num_prompt_tokens, completion_tokens=delta.num_output_tokens,
                 cached_tokens=delta.num_cached_tokens)
    t: Timings | None = delta.timings
    if t is not None:
        if t.first_scheduled is not None:
            u.queue_time_s = t.first_scheduled - t.arrival
        if t.first_token is not None:
            u.ttft_s = t.first_token - t.arrival
            if t.last_token is not None:
                u.decode_time_s = t.last_token - t.first_token
        if t.finished is not None:
            u.e2e_time_s = t.finished - t.arrival
    return u


def finish_fields(delta: CompletionDelta) -> dict:
    reason, stop = delta.finish_reason, delta.stop_reason
    if reason == FinishReason.STOP:
        if isinstance(stop, str):
            return {"finish_reason": pb.FINISH_REASON_STOP_STRING, "stop_string": stop}
        return {"finish_reason": pb.FINISH_REASON_STOP, "stop_token_id": int(stop)}
    fields = {"finish_reason": FINISH_REASONS[reason]}
    if reason == FinishReason.ERROR and stop:
        fields["error"] = str(stop)
    return fields


def token_logprobs(delta: CompletionDelta, tokenizer) -> list[pb.TokenLogprob]:
    out = []
    for s in delta.samples:
        if s.logprob is None:
            continue
        top = [pb.TopLogprob(token_id=t, logprob=lp, token=tokenizer.decode([t], skip_special_tokens=False))
               for t, lp in (s.top_logprobs or [])]
        out.append(pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob, top=top))
    return out


def stream_events(delta: CompletionDelta, model: str, tokenizer) -> list[pb.StreamEvent]:
    events = []
    if delta.text or delta.token_ids:
        events.append(pb.StreamEvent(request_id=delta.request_id, model=model, delta=pb.Delta(
            index=delta.index, text=delta.text, token_ids=delta.token_ids,
            logprobs=token_logprobs(delta, tokenizer))))
    if delta.finished:
        end = pb.ChoiceEnd(index=delta.index, usage=usage(delta), **finish_fields(delta))
        events.append(pb.StreamEvent(request_id=delta.request_id, model=model, end=end))
    return events


class ResponseBuilder:
    """Accumulates deltas into a unary ChatResponse.

    A choice's message is made at its first delta (not ``n`` of them up front: ``n`` is checked by
    the engine after the builder exists). ``error`` is the engine's reason when it failed a choice.
    """

    def __init__(self, request_id: str, model: str):
        self.response = pb.ChatResponse(request_id=request_id, model=model)
        self.choices: dict[int, pb.Choice] = {}
        self.error: str | None = None

    def add(self, delta: CompletionDelta, tokenizer) -> None:
        choice = self.choices.get(delta.index)
        if choice is None:
            choice = self.choices[delta.index] = pb.Choice(index=delta.index)
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        choice.logprobs.extend(token_logprobs(delta, tokenizer))
        if delta.finished:
            for key, value in finish_fields(delta).items():
                if key == "error":
                    self.error = self.error or value
                else:
                    setattr(choice, key, value)
            if delta.finish_reason == FinishReason.ERROR and self.error is None:
                self.error = "the engine failed the request"
            choice.usage.CopyFrom(usage(delta))

    def build(self) -> pb.ChatResponse:
        self.response.choices.extend(self.choices[i] for i in sorted(self.choices))
        total = self.response.usage
        choices = [c.usage for c in self.response.choices]
        if choices:
            total.prompt_tokens = choices[0].prompt_tokens
            total.cached_tokens = max(u.cached_tokens for u in choices)
            total.completion_tokens = sum(u.completion_tokens for u in choices)
            # the request's times: its first choice scheduled and its first token; its longest decode
            # and end to end (one choice: that choice's times)
            total.queue_time_s = min(u.queue_time_s for u in choices)
            total.ttft_s = min(u.ttft_s for u in choices)
            total.decode_time_s = max(u.decode_time_s for u in choices)
            total.e2e_time_s = max(u.e2e_time_s for u in choices)
        return self.response


def model_info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, architecture=info.architecture, format=info.format, bits_per_weight=info.bits_per_weight,
        max_context=info.max_context, kv_cache_dtype=info.kv_cache_dtype, vocab_size=info.vocab_size,
        weight_bytes=info.weight_bytes, kv_bytes_per_token=info.kv_bytes_per_token,
        kv_capacity_tokens=info.kv_capacity_tokens, num_layers=info.num_layers, hidden_size=info.hidden_size,
    )
