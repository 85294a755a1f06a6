"""The one place the config is read: DictConfig in, plain built parts out."""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .corruptions import CORRUPTIONS, Corruption
from .data import DATASETS, IMAGE_SHAPES, DamagedFile, Splits
from .devices import DEVICES
from .losses import LOSSES, ReconstructionLoss
from .models import MODELS, Autoencoder
from .optim import OPTIMIZERS
from .keys import empty_merge, shape_error, similar_key, wrong_shape
from .registry import ConfigError, Registry, choice, flag, number
from .runs import EVAL_OVERRIDES, check_overrides, current_defaults, not_a_run
from .regularizers import REGULARIZERS, Penalty
from .samplers import SAMPLERS, Sampler
from .schedules import SCHEDULES, Schedule

GROUPS = {"data": DATASETS, "model": MODELS, "loss": LOSSES, "reg": REGULARIZERS,
          "corruption": CORRUPTIONS, "optim": OPTIMIZERS, "sched": SCHEDULES, "device": DEVICES}
NO_SCHEDULE = {"name": "none"}  # the sched of a run saved before the group existed


CONVERGENCE_WINDOW = 10  # epochs the verdict looks back when trainer.patience is null


@dataclass(frozen=True)
class Trainer:
    epochs: int
    batch_size: int
    seed: int
    log_every: int
    cuda_graph: str  # auto | on | off: replay the whole training step as one CUDA graph
    compile: bool  # torch.compile the training objective
    tf32: bool  # TF32 matmuls and convolutions on CUDA (float32 otherwise)
    patience: int | None  # stop after this many epochs without a relative improvement of min_delta; None: never
    min_delta: float  # an improvement of the validation objective counts when it is at least this fraction
    min_epochs: int  # no early stop, and no per-epoch schedule step, before this many epochs
    checkpoint_every: float  # seconds between an epoch end's checkpoints (0: every epoch; the first and last always)

    @property
    def window(self) -> int:
        """The epochs over which the convergence verdict looks for an improvement."""
        return self.patience or CONVERGENCE_WINDOW


@dataclass(frozen=True)
class EvalSettings:
    threshold: float  # a unit is active on a sample when its activation > threshold (the seed's 0.1)
    noise: dict[str, Corruption]  # test corruptions for the robustness metrics, by label (mse_<label>)
    noise_settings: dict[str, str]  # each label's corruption as set: "gaussian noise_factor=0.3"
    probe: bool  # linear probes on codes and on pixels
    probe_max_samples: int
    features: int  # decoded one-hot codes to draw
    feature_value: float | str  # the code value they are drawn at, or "typical": each unit's when it fires
    projector: int  # test codes in TensorBoard's Projector tab; 0: none

    @property
    def typical_features(self) -> bool:
        """features.png draws each unit at its own typical value when it fires, not at one code value."""
        return self.feature_value == "typical"


@dataclass(frozen=True)
class SampleSettings:  # `aelab sample`: chains drawn from a trained model
    method: Sampler  # chain: x <- f(C(x)); langevin: Langevin steps along the score estimate (f(x) - x) / sigma^2;
    # annealed: Langevin steps through a sweep's models, one per sigma, largest first (samplers.SAMPLERS)
    steps: int  # steps of each chain (annealed: at each sigma)
    count: int  # chains, run side by side
    start: str  # noise: uniform random pixels; test: the first `count` test images
    noise: float | None  # the chain's gaussian noise_factor; None: the run's own training corruption
    seed: int  # the start's and the chain's noise
    step_size: float  # langevin, annealed: the step as a fraction of sigma^2


@dataclass
class Parts:
    device: torch.device
    data: Splits
    model: Autoencoder
    loss: ReconstructionLoss
    penalty: Penalty
    corruption: Corruption
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    trainer: Trainer
    evaluation: EvalSettings
    sampling: SampleSettings

    @property
    def trace(self) -> bool:
        """Keep encoder derivatives in the forward pass (exact closed-form Jacobian)."""
        return self.penalty.jacobian == "exact" and hasattr(self.model, "jacobian_sq_norm")

    @property
    def input_grad(self) -> bool:
        """The penalty differentiates the code with respect to the input through autograd."""
        return self.penalty.jacobian is not None and not self.trace


def build_part(group: str, registry: Registry, node, **context):
    """`registry[node.name](**node's other keys, **the context the builder asks for)`."""
    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        builder = registry.get(options.pop("name", None))
        accepted = inspect.signature(builder).parameters
        unknown = sorted(set(options) - set(accepted) - set(context))
        if unknown:
            keys = ", ".join(k for k in accepted if k not in context)
            raise ConfigError(f"unknown key(s) {', '.join(unknown)}; this {group} takes: {keys}", unknown[0])
        missing = [k for k, p in accepted.items()
                   if p.default is p.empty and k not in options and k not in context]
        if missing:
            raise ConfigError(f"missing value; add {missing[0]}=... on the command line", missing[0])
        return builder(**options, **{k: v for k, v in context.items() if k in accepted})
    except ConfigError as e:
        raise e.within(group) from None


CUDA_GRAPH = ("auto", "on", "off")


def known_keys(node, settings: type, section: str) -> None:
    """A section read key by key (trainer, eval) has no key its settings lack: `+trainer.epochz=3`
    would otherwise be taken and read by nothing."""
    names = [f.name for f in fields(settings)]
    for key in node:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {section}.{near[0]}?)" if near else ""
            raise ConfigError(f"no such key{hint}; {section} has: {', '.join(names)}", str(key))


def trainer_settings(node) -> Trainer:
    try:
        known_keys(node, Trainer, "trainer")
        return Trainer(epochs=number(node.epochs, "epochs", low=1, integer=True),
                       batch_size=number(node.batch_size, "batch_size", low=1, integer=True),
                       seed=number(node.seed, "seed", integer=True),
                       log_every=number(node.log_every, "log_every", low=1, integer=True),
                       cuda_graph=choice(node.cuda_graph, "cuda_graph", CUDA_GRAPH),
                       compile=flag(node.compile, "compile"),
                       tf32=flag(node.tf32, "tf32"),
                       patience=None if node.patience is None else number(node.patience, "patience", low=1,
                                                                          integer=True),
                       min_delta=number(node.min_delta, "min_delta", low=0, high=1, high_open=True),
                       min_epochs=number(node.min_epochs, "min_epochs", low=0, integer=True),
                       checkpoint_every=number(node.checkpoint_every, "checkpoint_every", low=0))
    except ConfigError as e:
        raise e.within("trainer") from None


def set_matmul_precision(tf32: bool) -> None:
    """float32 matmuls and convolutions on CUDA, or TF32 ones (faster on Ampere and later)."""
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def feature_value(value) -> float | str:
    """eval.feature_value: a code value > 0, or "typical" (each unit's value when it fires)."""
    if value == "typical":
        return value
    try:
        return number(value, "feature_value", low=0, low_open=True)
    except ConfigError:
        raise ConfigError(f"must be a code value > 0 or typical, got {value!r}", "feature_value") from None


def eval_settings(node, image_shape: tuple[int, int, int]) -> EvalSettings:
    try:
        known_keys(node, EvalSettings, "eval")
        if not isinstance(node.noise, (DictConfig, dict, type(None))):  # eval.noise=5
            raise ConfigError(f"takes corruptions and their settings, e.g. eval.noise.gaussian.noise_factor=0.3, "
                              f"or null for none; got {node.noise!r}", "noise")
        entries = {label: (name, options) for name, params in (node.noise or {}).items()  # null: none
                   for label, options in noise_entries(name, params)}
        noise = {label: build_part(f"noise.{name}", CORRUPTIONS, {"name": name, **options}, image_shape=image_shape)
                 for label, (name, options) in entries.items()}
        settings = {label: " ".join([name, *(f"{key}={value}" for key, value in options.items())])
                    for label, (name, options) in entries.items()}
        return EvalSettings(threshold=number(node.threshold, "threshold"), noise=noise, noise_settings=settings,
                            probe=flag(node.probe, "probe"),
                            probe_max_samples=number(node.probe_max_samples, "probe_max_samples", low=10,
                                                     integer=True),
                            features=number(node.features, "features", low=1, integer=True),
                            feature_value=feature_value(node.feature_value),
                            projector=number(node.projector, "projector", low=0, integer=True))
    except ConfigError as e:
        raise e.within("eval") from None


SAMPLE_STARTS = ("noise", "test")


def sample_settings(node) -> SampleSettings:
    try:
        known_keys(node, SampleSettings, "sample")
        method = SAMPLERS.get(choice(node.method, "method", tuple(SAMPLERS)))()
        return SampleSettings(method=method,
                              steps=number(node.steps, "steps", low=1, integer=True),
                              count=number(node.count, "count", low=1, integer=True),
                              start=choice(node.start, "start", SAMPLE_STARTS),
                              noise=None if node.noise is None else number(node.noise, "noise", low=0),
                              seed=number(node.seed, "seed", integer=True),
                              step_size=number(node.step_size, "step_size", low=0, high=2, low_open=True))
    except ConfigError as e:
        raise e.within("sample") from None


def noise_entries(name: str, params) -> list[tuple[str, dict]]:
    """One `eval.noise` entry as (label, options) pairs: a list for one key measures each value, labelled
    by it (`eval.noise.gaussian.noise_factor=[0.1,0.5]` → mse_gaussian_0.1 and mse_gaussian_0.5)."""
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, (dict, type(None))):  # eval.noise.gaussian=5
        keys = [k for k in inspect.signature(CORRUPTIONS.get(name)).parameters if k != "image_shape"]
        example = f"eval.noise.{name}.{keys[0]}={params}" if keys else f"eval.noise.{name}=null"
        raise ConfigError(f"takes its settings by key, e.g. {example}; got {params!r}", f"noise.{name}")
    options = dict(params or {})
    listed = [key for key, value in options.items() if isinstance(value, (list, tuple))]
    if not listed:
        return [(name, options)]
    if len(listed) > 1:
        raise ConfigError(f"a list of values for one key at most, got lists for {' and '.join(listed)}; "
                          f"keep one list and give the others one value", f"noise.{name}")
    key, values = listed[0], options[listed[0]]
    if not values or len(set(map(str, values))) < len(values):
        raise ConfigError(f"give one or more distinct values in the list; got {values}", f"noise.{name}.{key}")
    return [(f"{name}_{value}", {**options, key: value}) for value in values]


def check_contracts(model: Autoencoder, loss: ReconstructionLoss, penalty: Penalty) -> None:
    """The cross-part contracts that need no data and no device."""
    if loss.needs_sigmoid_output and not model.sigmoid_output:
        raise ConfigError("loss=bce needs a sigmoid output; set model.output_activation=sigmoid",
                          "model.output_activation")
    if penalty.needs_unit_latent and not model.latent_unit_interval:
        raise ConfigError(f"reg={penalty.name} needs latent activations in (0, 1); set "
                          f"model.latent_activation=sigmoid (or model=sparse_kl)", "model.latent_activation")


def check_data(data: Splits, loss: ReconstructionLoss, trainer: Trainer) -> None:
    """The contracts between the data and the loss or the batch size."""
    if loss.needs_sigmoid_output:
        low, high = data.train.x.min().item(), data.train.x.max().item()
        if low < 0 or high > 1:
            raise ConfigError(f"loss=bce needs targets in [0, 1], but data={data.name} spans "
                              f"[{low:g}, {high:g}]; use loss=mse or rescale the data", "loss")
    if trainer.batch_size > len(data.train):
        raise ConfigError(f"must be <= the {len(data.train)} training samples of data={data.name}, "
                          f"got {trainer.batch_size}", "trainer.batch_size")


def check_compatible(data: Splits, model: Autoencoder, loss: ReconstructionLoss, penalty: Penalty,
                     trainer: Trainer, device: torch.device) -> None:
    """Cross-part contracts, checked once before training."""
    check_contracts(model, loss, penalty)
    check_data(data, loss, trainer)
    if trainer.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError(f"=on needs a CUDA device, but device is {device.type}; use trainer.cuda_graph=auto "
                          f"(graphs where CUDA is, eager elsewhere) or off", "trainer.cuda_graph")


def shaped_parts(cfg: DictConfig, image_shape: tuple[int, int, int]
                 ) -> tuple[Autoencoder, ReconstructionLoss, Penalty, Corruption, EvalSettings]:
    """The parts that need only the image shape, on the CPU."""
    model = build_part("model", MODELS, cfg.model, input_shape=image_shape)
    loss = build_part("loss", LOSSES, cfg.loss)
    penalty = build_part("reg", REGULARIZERS, cfg.reg)
    corruption = build_part("corruption", CORRUPTIONS, cfg.corruption, image_shape=image_shape)
    return model, loss, penalty, corruption, eval_settings(cfg.eval, image_shape)


def build(cfg: DictConfig, job_num: int | None = None, data: Splits | None = None) -> Parts:
    """Config → parts, in dependency order; every problem surfaces here as a ConfigError.

    `job_num`, a sweep job's number, spreads local sweep jobs over several GPUs; `data`: the splits
    cfg.data gives, read already (the jobs of a stacked sweep share them)."""
    trainer, sampling = trainer_settings(cfg.trainer), sample_settings(cfg.sample)
    device = build_part("device", DEVICES, cfg.device, job_num=job_num)
    torch.manual_seed(trainer.seed)
    known_shape = IMAGE_SHAPES.get(cfg.data.get("name"))  # a bad model, loss or reg is refused before the
    shaped = shaped_parts(cfg, known_shape) if known_shape else None  # data is read (seconds: scikit-learn)
    data = data or build_part("data", DATASETS, cfg.data)
    model, loss, penalty, corruption, evaluation = shaped or shaped_parts(cfg, data.image_shape)
    check_compatible(data, model, loss, penalty, trainer, device)
    set_matmul_precision(trainer.tf32)
    model = model.to(device)
    optimizer = build_part("optim", OPTIMIZERS, cfg.optim, params=model.parameters(), device=device)
    schedule = build_part("sched", SCHEDULES, cfg.get("sched") or NO_SCHEDULE).bind(optimizer)
    return Parts(device, resident(data, device), model, loss, penalty, corruption, optimizer, schedule, trainer,
                 evaluation, sampling)


def check(cfg: DictConfig, loaded: dict[str, Splits | None]) -> None:
    """What build() would refuse, found without touching a device, so that every job of a sweep is
    checked before the first one starts. `loaded` keeps each data set read so far (by its settings);
    one whose files are not here (a SLURM job's node may have them) is checked by its job, and
    data.IMAGE_SHAPES stands in for it. The device is left to the job as well."""
    trainer = trainer_settings(cfg.trainer)
    sample_settings(cfg.sample)
    known_shape = IMAGE_SHAPES.get(cfg.data.get("name"))  # as build(): the parts are refused before the data
    shaped = shaped_parts(cfg, known_shape) if known_shape else None  # is read
    data = readable_data(cfg.data, loaded)
    if shaped is None and data is None:  # a data set of unknown shape, not readable here: its job checks its parts
        return
    model, loss, penalty, _, _ = shaped or shaped_parts(cfg, data.image_shape)
    check_contracts(model, loss, penalty)
    if data:
        check_data(data, loss, trainer)
    build_part("optim", OPTIMIZERS, cfg.optim, params=model.parameters(), device=torch.device("cpu"))
    build_part("sched", SCHEDULES, cfg.get("sched") or NO_SCHEDULE)


def readable_data(node: DictConfig, loaded: dict[str, Splits | None]) -> Splits | None:
    """The data set `node` names, read once per setting; None where its files are not on this machine."""
    key = OmegaConf.to_yaml(node)
    if key not in loaded:
        try:
            loaded[key] = build_part("data", DATASETS, node)
        except ConfigError as e:
            if e.key not in ("data.root", "data.download") or isinstance(e, DamagedFile):  # every node would refuse it
                raise
            loaded[key] = None
    return loaded[key]


def resident(data: Splits, device: torch.device, share: float = 0.5) -> Splits:
    """Move the data to the device when it takes under `share` of the free device memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(s.x.numel() * s.x.element_size() for s in (data.train, data.val, data.test))
        if size > share * free:
            return data
    return data.to(device)


def device_option(name: str) -> DictConfig:
    """The device group's option NAME as configs/device/NAME.yaml sets it (a name it lacks: just the
    name, which build() refuses with the options)."""
    from importlib.resources import files
    if name not in DEVICES.names():
        return OmegaConf.create({"name": name})
    return OmegaConf.create(files("aelab.configs").joinpath("device", f"{name}.yaml").read_text())


def run_config(run_dir: Path, overrides: list[str], allowed: tuple[str, ...] = EVAL_OVERRIDES,
               example: str = "eval.noise.gaussian.noise_factor=0.5") -> DictConfig:
    """A finished run's composed config (.hydra/config.yaml) with overrides of the keys under `allowed`
    (`aelab eval`: eval.* and device.*)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise not_a_run(run_dir, ".hydra/config.yaml", "RUN_DIR")
    fix = "it is the run's composed config, which aelab eval and sample read: put it back, or train the run again"
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's errors, and OmegaConf's on a document it cannot hold
        raise ConfigError(f"{path} is unreadable ({' '.join(str(e).split()[:12])}); {fix}", "RUN_DIR") from None
    if not isinstance(cfg, DictConfig) or not {"data", "model", "device"} <= set(cfg):
        raise ConfigError(f"{path} is unreadable (it holds no run config: no data, model or device); {fix}", "RUN_DIR")
    defaults = current_defaults()
    for section in ("trainer", "eval", "sample"):  # keys a run saved by an older aelab lacks take today's defaults
        for key, value in defaults[section].items():
            if key not in cfg.setdefault(section, {}):
                cfg[section][key] = value
    OmegaConf.set_struct(cfg, True)
    check_overrides(overrides, allowed, example)
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "device":  # another option of the group: the run may have trained on a GPU this machine lacks
            cfg.device = device_option(value)
            continue
        try:
            update = OmegaConf.from_dotlist([override])
            empty_merge(cfg, key, OmegaConf.select(update, key))
            cfg.merge_with(update)
        except OmegaConfBaseException as e:
            if wrong_shape(e):  # a list for a section, say
                typed = OmegaConf.select(update, key)
                typed = OmegaConf.to_container(typed) if OmegaConf.is_config(typed) else typed
                raise shape_error(OmegaConf.select(cfg, key), key, typed, override.partition("=")[2]) from None
            if OmegaConf.select(cfg, key) is None:
                near = similar_key(cfg, key)
                raise ConfigError(f"no such key{f' (did you mean {near}?)' if near else ''}; "
                                  f"see {path} for the keys", key) from None
            raise ConfigError(f"{str(e).splitlines()[0]}; see .hydra/config.yaml for the keys", key) from None
    return cfg


def chain_corruption(cfg: DictConfig, settings: SampleSettings, image_shape: tuple[int, int, int]
                     ) -> tuple[dict, Corruption]:
    """The corruption `aelab sample`'s chain applies, as its config and built: the run's own, or gaussian
    noise of sample.noise. A sampler whose step is scaled by a gaussian sigma needs one."""
    if settings.noise is not None:
        corruption = {"name": "gaussian", "noise_factor": settings.noise}
    else:
        corruption = OmegaConf.to_container(cfg.corruption, resolve=True)
        if settings.method.needs_sigma and corruption["name"] != "gaussian":
            raise ConfigError(f"sample.method={settings.method.name} needs the gaussian sigma of the score estimate "
                              f"(f(x) - x) / sigma^2, and this run trained with corruption={corruption['name']}; "
                              f"give one, e.g. sample.noise=0.3", "sample.noise")
    return corruption, build_part("corruption", CORRUPTIONS, corruption, image_shape=image_shape)


def section(cfg: DictConfig, name: str) -> dict:
    """A section of a run's config as plain data: for its records, and to compare runs."""
    return OmegaConf.to_container(cfg[name], resolve=True)


def build_model(cfg: DictConfig, image_shape: tuple[int, int, int], device: torch.device) -> Autoencoder:
    """The model a run's config describes, on `device`, freshly initialized (its weights: a checkpoint's)."""
    return build_part("model", MODELS, cfg.model, input_shape=image_shape).to(device)
