"""The run configuration: OmegaConf structured configs (dataclasses).

One YAML file (plus dotlist overrides) fills a :class:`RunConfig`. Every field has a type and
a default, so an unknown key or a wrong type fails at load time (see ``raykd.config.load``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start an embedded local node; "auto": join a cluster
    num_cpus: Optional[int] = None  # embedded node only
    num_gpus: Optional[int] = None
    # memory allocator of the worker processes: jemalloc (Ray's build, freed pages kept for
    # reuse: faster steps, more resident memory) | system (glibc)
    allocator: str = "jemalloc"


@dataclass
class RunSection:
    name: str = "raykd"
    output_dir: str = "runs"
    seed: int = 0
    # A run directory that exists is resumed (stages already done are skipped, a training stage
    # restarts from its last checkpoint).
    resume: bool = True
    # A run directory whose results another config produced is refused; overwrite=true redoes
    # every stage whose config or inputs changed, and every later one.
    overwrite: bool = False


@dataclass
class VLLMConfig:
    """vLLM engine settings of a role with ``backend: vllm`` (``rollout.vllm``, ``teacher.vllm``;
    raykd.roles.vllm.engine.DEFAULTS mirrors them). The actors run in vLLM's own venv."""

    python: Optional[str] = None  # interpreter; None: $RAYKD_VLLM_PYTHON, .venv-vllm/bin/python
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: fast start
    gpu_memory_utilization: float = 0.5  # GPU: share of the device for weights + KV cache
    kv_cache_gb: float = 1.0  # CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: Optional[int] = None  # None: the model's context length
    prefix_caching: bool = True
    multiprocessing: bool = False  # engine core in its own process (then no object_store sync)
    tensor_parallel_size: int = 1
    max_logprobs: Optional[int] = None  # scorer: None = max(teacher.top_k, 20)
    stop: list[str] = field(default_factory=list)  # sampler: stop strings besides EOS/<|im_end|>
    enable_sleep_mode: bool = False  # GPU: colocated engines can release memory during training


@dataclass
class TeacherConfig:
    # A hub name, a local HF directory, or a built-in offline name (smollm2-135m-instruct).
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    backend: str = "hf"  # scorer backend: raykd.roles.backends.SCORERS
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    num_threads: Optional[int] = None  # torch threads per worker; None: cpus_per_worker, rounded up
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Ray runtime_env of the workers
    # a scorer that dies mid-stage is rebuilt and its calls resent, at most this often per
    # worker (0: the stage stops instead)
    max_restarts: int = 3
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # backend=vllm engine settings
    top_k: int = 64  # top-k log-probs per position shipped to the learner (forward-KL targets)
    batch_size: int = 8
    cache_dir: Optional[str] = None  # teacher-target cache; default: ~/.cache/raykd/targets
    # word_kd: 0 = score every training example before training; L > 0 = score lazily, L steps
    # ahead of the learner, so teacher and learner work at once (on separate devices).
    prefetch_steps: int = 0


@dataclass
class StudentConfig:
    # from_teacher: keep a subset of the teacher's layers; pretrained: load `model`;
    # config: build from `model_config` (random init); width: prune the teacher's width
    # (raykd.models.width), every layer kept unless `keep`/`layers` cut them first.
    init: str = "from_teacher"
    model: Optional[str] = None
    model_config: dict[str, Any] = field(default_factory=dict)
    rule: str = "every_other"  # every_other | first_last | angular | explicit
    keep: Optional[int] = None  # number of layers to keep (every_other/first_last/angular)
    layers: Optional[list[int]] = None  # explicit layer indices
    calibration_prompts: int = 16
    # Which parameters learn: all | layers (freeze embeddings, final norm and lm_head)
    trainable: str = "all"
    # init=width (Minitron): heads (by KV group), MLP channels and hidden channels ranked by
    # activation importance on the calibration prompts; `width_axes` shrink by one common share
    # to at most `target_non_embedding_params`; `width_sizes` fixes sizes (hidden_size,
    # intermediate_size, num_attention_heads, num_key_value_heads) instead.
    target_non_embedding_params: Optional[int] = None
    width_axes: list[str] = field(default_factory=lambda: ["mlp", "hidden"])  # mlp|heads|hidden
    width_sizes: dict[str, int] = field(default_factory=dict)
    width_multiple: int = 16  # solved MLP (and hidden: also of the head count) multiples
    width_importance: str = "mean_abs"  # mean_abs | l2 over calibration tokens


@dataclass
class DataConfig:
    task: str = "stdlib_code"  # stdlib_code | dolly | function_tasks | humaneval | codeforces
    path: Optional[str] = None
    max_length: int = 256
    num_train: Optional[int] = None
    num_eval: Optional[int] = 32
    eval_fraction: float = 0.2
    # Seeds the train/eval split and the order of both splits; None: run.seed. Set it to
    # compare training seeds on one held-out set (and to reuse a teacher tuned on its split).
    split_seed: Optional[int] = None
    system_prompt: Optional[str] = None
    # Evaluate on another task's eval split (e.g. humaneval) instead of data.task's own.
    eval_task: Optional[str] = None
    eval_path: Optional[str] = None  # its data file, for tasks that need one


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    cpus_per_rank: float = 0.5
    gpus_per_rank: float = 0.0
    num_threads: Optional[int] = None  # torch threads per rank; None: cpus_per_rank, rounded up
    runtime_env: dict[str, Any] = field(default_factory=dict)
    zero_stage: int = 2
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    micro_batch_size: int = 4  # per rank
    grad_accum: int = 1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 128  # positions per chunk in the full-vocabulary losses
    # consecutive steps with a non-finite loss or gradient (each skipped) before the run stops
    max_bad_steps: int = 3


@dataclass
class RolloutConfig:
    backend: str = "hf"  # sampler backend: raykd.roles.backends.SAMPLERS
    dtype: str = "float32"
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    num_threads: Optional[int] = None  # torch threads per worker; None: cpus_per_worker, rounded up
    runtime_env: dict[str, Any] = field(default_factory=dict)  # e.g. {py_executable: ...}
    # a sampler that dies mid-stage is rebuilt, given the learners' weights and its calls
    # resent, at most this often per worker (0: the stage stops instead)
    max_restarts: int = 3
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # backend=vllm engine settings
    # learner -> samplers: raykd.roles.weight_sync.STRATEGIES (shared_memory | object_store |
    # torch_group | cuda_ipc) or auto, the backend's own choice (hf: shared_memory, falling
    # back to object_store across nodes; vllm: object_store); shared_memory needs
    # rollout.backend=hf, torch_group and cuda_ipc rollout.backend=vllm
    weight_sync: str = "auto"
    shm_dir: str = "/dev/shm"  # tmpfs directory of shared_memory sync's weight file
    sync_bucket_mb: float = 64.0  # weights travel in (name, tensor) buckets of this size
    batch_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class WordKDConfig:
    """Off-policy word-level KD on dataset responses (Hinton)."""

    steps: int = 40
    alpha: float = 0.5  # weight of the KD term; 1 - alpha on cross-entropy
    temperature: float = 1.0
    divergence: str = "forward_kl"  # any name in raykd.losses
    divergence_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None  # overrides learner.lr for this stage


@dataclass
class DenseKDConfig:
    """Off-policy KD on dataset responses against full teacher logits, with the teacher(s)
    colocated in the learner actor (no top-k cache): a divergence or TAID, several teachers
    ensembled, optional hidden-state matching."""

    steps: int = 40
    objective: str = "divergence"  # divergence | taid
    alpha: float = 0.5  # weight of the KD term; 1 - alpha on cross-entropy
    temperature: float = 1.0
    divergence: str = "forward_kl"  # objective=divergence: any name in raykd.losses
    divergence_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_teachers: list[str] = field(default_factory=list)  # model dirs ensembled with teacher
    taid_t_start: float = 0.4  # objective=taid: t goes from t_start to t_end over `steps`
    taid_t_end: float = 1.0
    hidden_weight: float = 0.0  # weight of hidden-state matching (0 disables)
    hidden_kind: str = "mse"  # mse | cosine
    lr: Optional[float] = None


@dataclass
class OnPolicyConfig:
    """On-policy reverse KL, MiniLLM-style policy gradient."""

    steps: int = 4
    prompts_per_step: int = 8
    gamma: float = 1.0
    length_normalize: bool = True
    whiten: bool = False
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    # Weight of a cross-entropy term on dataset responses (MiniLLM's L_PT), 0 disables.
    lm_coef: float = 0.5
    # Teacher-mixed sampling: responses drawn from mix_alpha * p_T + (1 - mix_alpha) * q_S
    # (MiniLLM uses 0.2; the rollout workers then hold the teacher too). 0 = the student alone.
    mix_alpha: float = 0.0
    max_importance_weight: Optional[float] = None  # clip w_t = q_S/p~ (w_t <= 1/(1-mix_alpha))
    # Single-step full-vocabulary reverse KL at each sampled position (MiniLLM uses 1.0; the
    # teacher is then colocated in the learners). 0 disables.
    single_step_coef: float = 0.0
    lr: Optional[float] = None


@dataclass
class SFTConfig:
    """Supervised fine-tuning on dataset responses (teacher fine-tuning, or a student baseline)."""

    steps: int = 40
    lr: Optional[float] = None


@dataclass
class SeqKDConfig:
    """Sequence-level KD / SCoTD: fine-tune on N teacher samples per training prompt
    (sampling parameters come from the ``rollout`` section)."""

    steps: int = 40
    samples_per_prompt: int = 1
    # SCoTD: appended to the teacher's user turn only (e.g. "Think step by step, then give the
    # answer."); the student is trained on the original prompt with the teacher's response.
    teacher_instruction: str = ""
    lr: Optional[float] = None


@dataclass
class GKDConfig:
    """Generalized KD (Agarwal et al. 2024): JSD(beta) on a mix of student samples and
    dataset responses; sampling parameters come from the ``rollout`` section."""

    steps: int = 40
    lmbda: float = 0.5  # probability that a step trains on the student's own samples
    off_policy: str = "dataset"  # the other steps' responses: dataset | teacher (its samples)
    beta: float = 0.5  # generalized JSD: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # of the teacher targets and the student in the divergence
    lr: Optional[float] = None


@dataclass
class GRPOConfig:
    """GRPO with rule-based rewards (raykd.rewards) and an optional KL to the stage's start."""

    steps: int = 20
    prompts_per_step: int = 4
    group_size: int = 4  # sampled responses per prompt
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # upper clip; None = epsilon
    beta: float = 0.0  # weight of the KL penalty to the reference (the stage's start model)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    rewards: list[str] = field(default_factory=lambda: ["format"])  # names in REWARDS
    reward_weights: Optional[list[float]] = None  # None = 1.0 each
    reward_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {length: {target: 64}}
    # Optimizer steps per sampled batch (the paper's mu, TRL's num_iterations); > 1 reuses the
    # samples and is what the clip is for.
    ppo_epochs: int = 1
    # Rewards run in process (0) or as this many Ray tasks per step; a step whose rewards take
    # longer than reward_timeout_s fails with a message.
    reward_tasks: int = 0
    reward_timeout_s: Optional[float] = 600.0
    reward_cpus_per_task: float = 0.5  # CPUs each reward task reserves (sandboxed programs)
    # Sandbox layers that must work (e.g. [seccomp, landlock]); a stage refuses to train, with
    # the probe's reason, when one is missing. [] = use what works, warn about the rest.
    sandbox_require: list[str] = field(default_factory=list)
    # Dense teacher term: r_i += w * mean_t log p_T(y_t) over the response tokens of y_i
    # (teacher scorers score the sampled responses); 0 = off.
    teacher_logprob_weight: float = 0.0
    # Append every sampled completion with its rewards to data/<stage>-completions.jsonl.
    save_completions: bool = True
    lr: Optional[float] = None


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 160
    sample_seeds: list[int] = field(default_factory=list)  # seeded sampled decodes besides greedy
    temperature: float = 0.7
    num_report_samples: int = 3
    # Code tasks with tests: pass@k over the sampled decodes for these k (k <= len(sample_seeds))
    pass_k: list[int] = field(default_factory=lambda: [1])
    exec_timeout_s: float = 5.0  # wall-clock limit of one sandboxed test run
    # Code tasks: a "stub" row (the requested signature + `pass`, no model) in every table
    stub_baseline: bool = True
    # Code tasks: every model also on HumanEval's 164 problems (greedy, tests in the sandbox)
    humaneval: bool = False
    humaneval_max_new_tokens: int = 384
    humaneval_problems: Optional[int] = None  # a sub-sample of the 164 (None: all)


@dataclass
class PipelineConfig:
    # The stages, in order: each {name, algorithm, trains?, ...params}. `algorithm` names a
    # section of this config (sft, word_kd, ...), whose values are the stage's defaults; the
    # entry's other keys override them, so one algorithm may run twice with other settings.
    # `trains: teacher` (sft only) fine-tunes the teacher before the student is cut from it.
    # Default (neither stages nor train given): word_kd, then reverse_kl.
    stages: Optional[list[dict[str, Any]]] = None
    # Shorthand: a list of algorithm names, one stage each ("1-word_kd", "2-reverse_kl", ...).
    train: Optional[list[str]] = None
    # Shorthand: prepend a teacher SFT stage ("teacher-sft", `teacher_sft` section); the
    # fine-tuned teacher is then the one the student is cut from, distilled from and compared to.
    finetune_teacher: bool = False
    eval_teacher: bool = True
    eval_student_before: bool = True
    checkpoint_every: int = 20


@dataclass
class QuantizeConfig:
    """The final task: weight-only quantization of the final student (raykd.quantize)."""

    enabled: bool = False
    # The first method is the shipped checkpoint; the others are baselines in the report
    # (rtn: round-to-nearest at the same bits/group size, what GPTQ's error feedback buys).
    methods: list[str] = field(default_factory=lambda: ["gptq", "rtn"])
    bits: int = 4  # 3, 4 or 8
    group_size: int = 32  # -1 (per channel) or a size dividing every layer input (576: 32, 64)
    act_order: bool = False  # GPTQ: columns in order of decreasing Hessian diagonal
    sym: bool = False  # symmetric grid (format gptq v1) instead of min/max (gptq_v2)
    damp_percent: float = 0.05  # GPTQ Hessian dampening, share of its mean diagonal
    calibration: int = 64  # prompt+response texts from the train split
    max_calibration_tokens: int = 512
    dtype: str = "bfloat16"  # storage dtype of what is not quantized (embeddings, norms)
    cpus: float = 1.0  # the quantize task's Ray resources
    gpus: float = 0.0
    num_threads: Optional[int] = None  # torch threads in the task; None: cpus, rounded up
    eval: bool = True  # evaluate each quantized model on the eval split (same eval code)
    # Load time, peak load memory and greedy tokens/s of the float and quantized students,
    # each measured in a fresh worker process on this many eval prompts.
    measure_prompts: int = 4
    measure_new_tokens: int = 32


#: Stage algorithms and the config section that holds each one's defaults.
STAGE_SECTIONS: dict[str, type] = {
    "sft": SFTConfig,
    "word_kd": WordKDConfig,
    "dense_kd": DenseKDConfig,
    "reverse_kl": OnPolicyConfig,
    "seqkd": SeqKDConfig,
    "gkd": GKDConfig,
    "grpo": GRPOConfig,
}


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    ray: RayConfig = field(default_factory=RayConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    word_kd: WordKDConfig = field(default_factory=WordKDConfig)
    dense_kd: DenseKDConfig = field(default_factory=DenseKDConfig)
    reverse_kl: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    teacher_sft: SFTConfig = field(default_factory=SFTConfig)  # with pipeline.finetune_teacher
    seqkd: SeqKDConfig = field(default_factory=SeqKDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
