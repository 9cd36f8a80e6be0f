"""Pydantic schemas for everything `model/` needs: architecture, training stages, data, evaluation.

These are the validated shape of the Hydra tree in `conf/`. Unknown keys are errors
(`extra="forbid"`) so a typo in an override fails with the field's name instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """The base of every schema in the project (config tree, records, requests): unknown keys are
    errors, so a misspelt field fails naming itself instead of being silently ignored."""

    model_config = ConfigDict(extra="forbid")


class LLMConfig(Strict):
    """Qwen2-architecture causal LM. A null value is taken from `model.init.llm`'s config.json (or a
    fresh model's default); a value set here that the checkpoint contradicts is an error
    (`model.nn.sources.resolve`). `vocab_size` = the checkpoint's embedding rows (null for a fresh
    model: the tokenizer's length)."""

    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_hidden_layers: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    max_position_embeddings: int | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    rope_scaling: dict | None = Field(None, description="RoPE scaling as in config.json (rope_type, factor, ...)")
    sliding_window: int | None = Field(None, gt=0, description="window of the sliding-attention layers; null = full")
    max_window_layers: int | None = Field(None, ge=0, description="layers below this index keep full attention")
    vocab_size: int | None = Field(None, gt=0)
    tie_word_embeddings: bool | None = None
    rms_norm_eps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> LLMConfig:
        h, q, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if h and q and h % q:
            raise ValueError("llm.hidden_size must be divisible by llm.num_attention_heads")
        if q and kv and q % kv:
            raise ValueError("llm.num_attention_heads must be divisible by llm.num_key_value_heads")
        return self


class VisionConfig(Strict):
    """SigLIP vision tower with AnyRes tiling.

    An image is cut into a grid of `image_size` tiles chosen from `anyres_grids` (the paper does not
    publish its grid set; the default covers 1-4 tiles up to 2:1 / 3:1 aspect ratios), plus one
    downsampled thumbnail of the whole image when there is more than one tile. Each tile's patch grid
    is merged 2x2 by the projector: an odd grid (27x27 at 384/14) gives floor(g^2/4) tokens
    (729 -> 182), see `model.nn.projectors.merge_2x2`."""

    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_hidden_layers: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    image_size: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)
    num_channels: int | None = Field(None, gt=0)
    anyres_grids: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3)],
        min_length=1, description="candidate tile grids as (columns, rows); (1, 1) = no tiling")

    @model_validator(mode="after")
    def _grids(self) -> VisionConfig:
        # SigLIP floors: 384 / 14 -> a 27x27 grid
        if self.image_size and self.patch_size and self.image_size < 2 * self.patch_size:
            raise ValueError("vision.image_size must be at least 2 patches (2 * vision.patch_size)")
        bad = [g for g in self.anyres_grids if min(g) < 1]
        if bad:
            raise ValueError(f"vision.anyres_grids: {bad} - columns and rows must be >= 1")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per tile: floor(g^2/4) for a g x g patch grid (odd grids included)."""
        return self.grid**2 // 4

    @property
    def tokens_per_frame(self) -> int:
        """Video tokens per frame: the grid padded to even, merged 2x2 twice."""
        once = (self.grid + 1) // 2
        return ((once + 1) // 2) ** 2


class VideoConfig(Strict):
    fps: float = Field(1.0, gt=0, description="frames sampled per second of video (paper: 1)")
    max_frames: int = Field(48, gt=0, description="upper bound on sampled frames (paper: 48)")
    timestamps: bool = Field(True, description="write each frame's time ('3s') before its tokens, so the "
                                               "prompt can refer to moments in the video")
    use_audio_in_video: bool = Field(
        False, description="feed a video's own sound track with its frames, interleaved by time (each sampled "
                           "frame's tokens, then the sound up to the next frame); a record's or request's "
                           "`use_audio_in_video` overrides it, and a video without a sound track is frames only")


class AudioConfig(Strict):
    """Whisper encoder + Conv-GMLP projector. Any input length: the positional table is sliced.
    Null architecture values come from `model.init.audio`'s config.json (or a fresh default)."""

    num_mel_bins: int | None = Field(None, gt=0)
    d_model: int | None = Field(None, gt=0)
    encoder_layers: int | None = Field(None, gt=0)
    encoder_attention_heads: int | None = Field(None, gt=0)
    encoder_ffn_dim: int | None = Field(None, gt=0)
    max_source_positions: int | None = Field(None, gt=0)
    projector_stride: Literal[2, 4, 8] = 4
    sampling_rate: int = 16000
    max_seconds: float = Field(30.0, gt=0)


class TokenizerConfig(Strict):
    """`path` loads a checkpoint's tokenizer; otherwise a byte-level BPE is trained locally."""

    path: str | None = None
    vocab_size: int = 1024


PARTS = ("llm", "vision", "audio")
# A part without a checkpoint is built from the config: these must be set...
REQUIRED = {
    "llm": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size"),
    "audio": ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"),
}
# ...and these null values mean (sliding_window, rope_scaling and vocab_size stay null: off, none, the tokenizer's).
FRESH_DEFAULTS = {
    "llm": {"max_position_embeddings": 4096, "rope_theta": 1_000_000.0, "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6},
    "vision": {"num_channels": 3},
    "audio": {"num_mel_bins": 128, "max_source_positions": 1500},
}


class InitConfig(Strict):
    """Pretrained Hugging Face parts to start from (`omni model compose`, the DAG's init-model): a
    folder or s3:// URI each; a part not given is freshly initialised."""

    llm: str | None = Field(None, description="a Qwen2-class causal LM folder (config.json, safetensors, tokenizer)")
    vision: str | None = Field(None, description="a SigLIP folder: two-tower SiglipModel or SiglipVisionModel")
    audio: str | None = Field(None, description="a Whisper folder: WhisperForConditionalGeneration or WhisperModel")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the composed checkpoint; auto = the LLM's (else the first part's), fp32 "
                            "when nothing is loaded")

    def sources(self) -> dict[str, str]:
        return {part: uri for part in PARTS if (uri := getattr(self, part))}


class ModelConfig(Strict):
    name: str
    llm: LLMConfig = LLMConfig()
    vision: VisionConfig = VisionConfig()
    video: VideoConfig = VideoConfig()
    audio: AudioConfig = AudioConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    init: InitConfig = InitConfig()
    pretrained: str | None = Field(None, description="an omni checkpoint (folder or s3://) to continue from; "
                                                     "null = compose from model.init (fresh where a part is unset)")
    max_seq_len: int = Field(512, gt=0)
    loss_chunk_tokens: int | None = Field(
        None, ge=0, description="target tokens per chunk of the LM-head loss, which then never holds the full "
                                "logits (model.nn.loss); 0 = the plain loss; null = 1024 when the vocabulary has "
                                "more than 32768 entries, else the plain loss")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "varlen", "flex", "eager"] = Field(
        "auto", description="the LLM's attention kernel. varlen: torch's FlashAttention varlen kernel (CUDA); "
                            "flex: FlexAttention with a document mask (compiled on CUDA; forward only on a CPU). "
                            "auto: flash_attention_2 on a bf16 GPU with the flash-attn package, else varlen on a "
                            "bf16 GPU, else sdpa. With flash_attention_2, varlen or flex, packed rows train as one "
                            "unpadded row bounded by sample (model.nn.attention). The encoders always use sdpa.")

    def loss_chunk(self, vocab_size: int) -> int:
        """`loss_chunk_tokens` resolved for a vocabulary: the one place the default is decided."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return 1024 if vocab_size > 32768 else 0

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.pretrained and self.init.sources():
            raise ValueError(f"model.pretrained and model.init.{'/'.join(self.init.sources())} both say where to "
                             "start: continue from the omni checkpoint, or compose from parts, not both")
        if self.pretrained:
            return self
        for part in (p for p in PARTS if p not in self.init.sources()):
            values = getattr(self, part)
            if missing := [f for f in REQUIRED[part] if getattr(values, f) is None]:
                raise ValueError(f"model.{part}: {', '.join(missing)} not set: declare the {part} architecture in "
                                 f"conf/model, or give model.init.{part} to take it from a checkpoint's config.json")
            for key, value in FRESH_DEFAULTS[part].items():  # a part built from the config is complete in it
                if getattr(values, key) is None:
                    setattr(values, key, value)
        return self

    def part(self, name: str) -> LLMConfig | VisionConfig | AudioConfig:
        return getattr(self, name)


MODULES = ("vision_tower", "vision_projector", "video_projector", "audio_encoder", "audio_projector", "llm")


class LoraConfig(Strict):
    """LoRA adapters on the LLM's linear layers (peft): the LLM's own weights stay frozen, the
    adapters learn at the stage's llm rate, and they are merged into the weights when the stage ends."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="names of the LLM's nn.Linear layers that get adapters")


class StageConfig(Strict):
    """One training stage: which modules learn (the rest are frozen), at what learning rate."""

    name: str
    trainable: list[str] = Field(min_length=1)
    lr: float = Field(gt=0)
    lr_overrides: dict[str, float] = Field(default_factory=dict, description="per-module learning rate")
    data_tasks: list[str] = Field(min_length=1, description="record `task` values this stage trains on")
    steps: int = Field(gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between DeepSpeed checkpoints; 0 = none (a SIGTERM still saves one)")
    seed: int = 0
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    packing: bool = Field(False, description="pack several samples per row up to model.max_seq_len, "
                                             "attention isolated per sample; micro_batch_size counts rows")
    activation_checkpointing: bool | Literal["auto"] = Field(
        False, description="recompute LLM and encoder layer activations in backward: less memory, ~30% more "
                            "compute. auto: on where the memory plan (omni model plan) says the stage does not "
                            "fit the GPU without it; off on a CPU")
    lora: LoraConfig | None = Field(None, description="train the LLM through LoRA adapters (needs llm in trainable)")

    @model_validator(mode="after")
    def _known_modules(self) -> StageConfig:
        for name in [*self.trainable, *self.lr_overrides]:
            if name not in MODULES:
                raise ValueError(f"stage {self.name!r}: unknown module {name!r}; choose from {', '.join(MODULES)}")
        if self.lora and "llm" not in self.trainable:
            raise ValueError(f"stage {self.name!r}: lora adapts the LLM, but llm is not in trainable; add it")
        return self


class DataConfig(Strict):
    """Demo data generation and data-prep settings."""

    demo_images: int = Field(160, ge=0)
    demo_videos: int = Field(80, ge=0)
    demo_audios: int = Field(120, ge=0)
    demo_texts: int = Field(80, ge=0)
    demo_sound_videos: int = Field(
        0, ge=0, description="videos of a moving shape over a spoken number, asked which number is said: only "
                             "the sound answers (records with use_audio_in_video on)")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 30.0
    max_video_seconds: float = 120.0
    # Data-prep limits: records outside them go to quarantine with the limit's name in the reason.
    max_text_chars: int = Field(32768, gt=0, description="characters over all turns of one record")
    min_image_side: int = Field(8, gt=0, description="pixels; smaller images carry no usable content")
    max_image_aspect: float = Field(20.0, ge=1, description="long side / short side")
    min_audio_seconds: float = Field(0.1, ge=0)
    min_audio_sample_rate: int = Field(8000, gt=0, description="Hz of the source file, before resampling")
    records_per_shard: int = Field(1000, gt=0, description="samples per tar shard")
    # Media paths are data, not commands: only regular files are read, never more than this many bytes.
    max_media_bytes: int = Field(1024**3, gt=0, description="bytes of one media file, checked before reading it")
    media_roots: list[str] = Field(
        default_factory=list, description="folders local media may lie in (symlinks resolved; a relative path may "
                                          "also stay inside its JSONL file's folder); empty: anywhere prep can read")
    # Training reader (model/data/shards.py).
    shuffle_buffer: int = Field(1024, ge=1, description="samples mixed across shard boundaries; 1 = no shuffle")
    reader_cache_mb: float = Field(
        512, ge=0, description="MiB of encoded samples (pixels, log-mel) each reader process keeps, so repeats "
                               "in small sets skip decoding; 0 turns the cache off")
    loader_workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes decoding media for training; null = 4 per GPU "
                                "process where a GPU is present (media decoding must keep up), 0 on a CPU")


class SftFilterConfig(Strict):
    """Loss-based SFT filter (see model.training.sft_filter): the paper's mean +- 1 std rule, fitted
    per task by default."""

    enabled: bool = True
    k_sigma: float = Field(1.0, gt=0, description="keep samples within mean +- k_sigma * std (paper: 1)")
    group_by: Literal["task", "all"] = Field(
        "task", description="one Gaussian per record task, or one over everything (the paper's form)")
    min_group_size: int = Field(8, ge=2, description="smaller groups are kept whole: too few samples to fit")
    batch_size: int = Field(8, gt=0)
    examples: int = Field(5, ge=0, description="dropped samples per side shown in the report")
    data_tasks: list[str] | None = Field(
        None, description="record tasks to score; null = the sft stage's data_tasks (the pipeline fills them in, so "
                          "the filter's task does not depend on the rest of the sft stage, e.g. its learning rate)")


class EvalConfig(Strict):
    """How the evaluate step and `omni eval run` run the selected benchmarks (`benchmark:` in the tree)."""

    batch_size: int = Field(8, gt=0, description="conversations per generate call")
    max_samples: int | None = Field(None, gt=0, description="first N items of each benchmark (smoke runs); null = all")
    data_root: str | None = Field(
        None, description="folder (or s3:// prefix) that relative benchmark `data` paths resolve against; "
                          "null = the pipeline's data input")
    cache_uri: str | None = Field(
        None, description="where per-item predictions are kept so a killed evaluation resumes (folder or s3://); "
                          "null = <run.workdir>/eval-cache")
    baseline: Literal["initial", "none"] = Field(
        "initial", description="the report's 'before' column: the initial checkpoint on the same benchmarks (its own "
                               "task in the DAG, cached while the start and the benchmarks stay the same); none = "
                               "no column. The comparison that decides promotion is the gate's, against the "
                               "champion's scores in the registry")
    bootstrap: int = Field(1000, ge=0, description="resamples for the standard error of corpus metrics (WER, BLEU)")
    seed: int = 0


class EngineConfig(Strict):
    """How the generation engine (model.nn.engine) shares the model among concurrent requests; the
    serving config's `batching` section. `continuous`: a request joins the running batch at the next
    decode step; `dynamic`: a batch starts after `window_ms` (or when full) and runs to its end before
    the next one is admitted (kept for comparison: benchmarks/README.md)."""

    policy: Literal["continuous", "dynamic"] = "continuous"
    max_batch_size: int = Field(8, gt=0, description="sequences decoded together, each with its own KV-cache slot "
                                                     "(a v2 row is one sequence)")
    max_queue: int = Field(64, ge=0, description="sequences waiting beyond the batch; past it requests get 429")
    window_ms: float = Field(5.0, ge=0, description="dynamic policy only: how long a batch waits to fill")
    max_context: int | None = Field(
        None, gt=0, description="KV-cache columns per sequence: prompt + answer tokens one request may reach; at "
                                "most the LLM's context window (model.llm.max_position_embeddings); null: that window")
    prefill_chunk: int = Field(
        512, gt=0, description="prompt tokens prefilled per engine step: a longer prompt takes several steps, and the "
                               "running streams decode between its chunks")
    prefix_cache: bool = Field(
        True, description="reuse the keys and values of a finished request's prompt (and answer) for a newcomer "
                          "whose prompt starts the same way, media included: a chat's next turn, a shared system "
                          "prompt (model.nn.prefix_cache); kept in free KV-cache slots, no extra memory")
    cuda_graphs: bool | None = Field(
        None, description="replay decode steps as CUDA graphs (one per batch and width bucket); null: on when the "
                          "LLM is on a CUDA device")


BENCHMARK_READERS = ("vlmeval_tsv", "mmlu_csv", "video_mcq_json", "vqa_json", "ocrbench_json", "asr_manifest",
                     "covost2_tsv")
BENCHMARK_METRICS = ("mcq_accuracy", "vqa_accuracy", "anls", "relaxed_accuracy", "ocrbench_accuracy", "exact_match",
                     "wer", "cer", "bleu")
LOWER_IS_BETTER_METRICS = frozenset({"wer", "cer"})


class PromptTemplate(Strict):
    """lmms-eval's pre/post prompt around the item's question (and its lettered options)."""

    system: str | None = None
    pre_prompt: str = ""
    post_prompt: str = ""
    hint: bool = Field(True, description="put the item's hint (MMBench) before the question when it has one")


class GenerationSettings(Strict):
    max_new_tokens: int = Field(16, gt=0)
    stop: list[str] = Field(default_factory=list, description="the answer is cut at the first of these strings")


class BenchmarkLimits(Strict):
    """Media limits for benchmark items: benchmarks are read as they are, so these only guard the
    machine (a 10-hour clip), not the training distribution. null = no limit."""

    max_image_pixels: int = Field(8192 * 8192, gt=0)
    max_video_seconds: float | None = Field(None, gt=0)
    max_audio_seconds: float | None = Field(None, gt=0)


class BenchmarkConfig(Strict):
    """One entry of the benchmark registry (conf/benchmark/<name>.yaml): how to read the set, prompt
    the model and score the answers."""

    title: str = Field(description="the name the paper's tables use, e.g. MMBench-EN")
    family: str = Field(description="the paper's table this benchmark belongs to, e.g. 'image MCQ'")
    reader: Literal[BENCHMARK_READERS]  # type: ignore[valid-type]
    data: str | None = Field(None, description="file or folder (local or s3://); relative paths resolve against "
                                               "evaluation.data_root")
    options: dict[str, str] = Field(default_factory=dict, description="reader options (image_dir, audio_dir, ...)")
    use_audio_in_video: bool | None = Field(
        None, description="feed each video's sound track with its frames (Video-MME, WorldSense, Daily-Omni "
                          "questions that need the sound); null: the model's video.use_audio_in_video")
    metric: Literal[BENCHMARK_METRICS]  # type: ignore[valid-type]
    lang: str | None = Field(None, description="text normalisation language of the answers (en, zh, ...)")
    scoring: Literal["generate", "loglikelihood"] = Field(
        "generate", description="loglikelihood: pick the option letter the model finds most likely (MMLU-style)")
    circular: bool = Field(False, description="CircularEval: every rotation of the options must be answered right")
    categories: list[str] = Field(default_factory=list, description="item fields to break the score down by")
    prompt: PromptTemplate = PromptTemplate()
    generation: GenerationSettings = GenerationSettings()
    limits: BenchmarkLimits = BenchmarkLimits()
    paper: float | None = Field(None, description="what the paper reports (in its units: %, WER %, BLEU)")

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        if (self.circular or self.scoring == "loglikelihood") and self.metric != "mcq_accuracy":
            raise ValueError("circular and scoring=loglikelihood need metric: mcq_accuracy")
        return self
