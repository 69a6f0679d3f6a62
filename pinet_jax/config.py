"""Default training config and its validation.

Experiment files under experiments/ start from `default_config()` and
override fields; the command line overrides them again with
`--config.field=value`.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import ml_collections

from pinet_jax import models
from pinet_jax.errors import ConfigError

DATASETS = ('mnist', 'cifar10')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'one_cycle', 'step')
DTYPES = ('float32', 'bfloat16')
# jax.default_matmul_precision's names, from fastest to most exact.
MATMUL_PRECISIONS = ('default', 'high', 'highest')
# Fields that must be finite; NaN or inf would only show as a divergence.
FLOAT_FIELDS = (
  'learning_rate',
  'warmup_fraction',
  'decay_factor',
  'momentum',
  'weight_decay',
  'grad_clip_norm',
  'label_smoothing',
)


def default_config() -> ml_collections.ConfigDict:
  """Return the reference setup: Adam, lr 1e-3, batch 64, 10 epochs."""
  config = ml_collections.ConfigDict()

  config.dataset = 'mnist'
  # Folder with the publisher's raw files (MNIST IDX files, CIFAR-10
  # binary batches or archive). Empty: use a dataset tfds already prepared.
  config.data_dir = ''
  # Where tfds keeps prepared datasets; empty means tfds's default
  # (TFDS_DATA_DIR or ~/tensorflow_datasets).
  config.tfds_data_dir = ''
  # Let tfds download the dataset when it is neither local nor prepared.
  config.download = False
  # tfds split strings, so 'train[:1000]' trains on a slice.
  config.train_split = 'train'
  config.eval_split = 'test'
  # Pixels are scaled to [0, 1]; this also subtracts the training set's
  # per-channel mean and divides by its standard deviation.
  config.normalize = False
  # Random crop after zero padding of crop_padding pixels per side, which
  # shifts images by up to that many pixels, and, with flip, horizontal
  # flips of half of the images.
  config.augment = False
  config.crop_padding = 4
  config.flip = True

  config.model = 'polynet'
  # Constructor arguments of the model; the dataset sets num_classes and
  # in_channels. 's2d' computes the same function as 'plain', its blocks
  # 4.6x faster on CPU (docs/benchmarks.md); see
  # pinet_jax.models.product_block.FORMULATIONS.
  config.model_kwargs = ml_collections.ConfigDict(
    {'width': 16, 'init_scheme': 'pytorch', 'formulation': 's2d'}
  )

  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  # 'constant'; 'cosine', a decay to 0 over training; 'one_cycle', a
  # linear warm-up over warmup_fraction of the steps, then cosine decay to
  # 0; or 'step', multiplied by decay_factor after each of decay_fractions
  # of the steps. (1/3, 1/2, 2/3, 5/6) decays at epochs 40, 60, 80 and 100
  # of 120.
  config.schedule = 'constant'
  config.warmup_fraction = 0.0
  config.decay_fractions = ()
  config.decay_factor = 0.1
  config.momentum = 0.9  # sgd only
  config.weight_decay = 0.0  # decoupled, adamw and sgd only
  # When positive, each step's gradients are scaled down, if needed, to
  # this global L2 norm before the optimiser's update
  # (optax.clip_by_global_norm). A degree-32 network can produce a rare
  # gradient millions of times larger than usual, which Adam's moments
  # carry into the following steps. 0 leaves the gradients as they are.
  # The logged grad_norm is the norm before clipping.
  config.grad_clip_norm = 0.0
  # Weight moved from the true class onto a uniform target over all classes
  # in the training loss; evaluation reports the plain cross-entropy.
  config.label_smoothing = 0.0

  config.batch_size = 64
  config.eval_batch_size = 1000
  # Examples per forward and backward pass inside a train step; the
  # gradients of a step's microbatches add up to its whole batch's. 0
  # chooses: a divisor of the batch from 16 down to 8 on CPU, where that is
  # faster, and the whole batch on GPU and TPU. Otherwise it must divide
  # batch_size. Evaluation always chooses, because its microbatches give
  # identical results.
  config.microbatch_size = 0
  # Dtype of the forward and backward passes. 'bfloat16' halves the memory
  # of activations and runs faster on TPUs and recent GPUs; parameters,
  # optimiser state, BatchNorm statistics and the loss stay float32.
  config.dtype = 'float32'
  # Precision of float32 matrix products and convolutions. 'default' lets
  # TPUs use one bfloat16 pass and Ampere or newer GPUs TensorFloat-32,
  # about 3 significant digits; 'high' uses 3 bfloat16 passes on TPUs;
  # 'highest' is full float32 everywhere, several times slower there. CPUs
  # compute in full float32 whatever the setting.
  config.matmul_precision = 'default'
  config.num_epochs = 10
  # When positive, the run's length in steps, replacing num_epochs: it may
  # end mid-epoch or go on past num_epochs.
  config.num_train_steps = -1
  config.log_every_steps = 100
  config.keep_checkpoints = 3
  # Save a checkpoint every this many steps as well, so a killed run loses
  # less than an epoch. 0 saves only after each epoch's evaluation. Saves
  # run in the background, but each one waits for the previous to finish.
  config.checkpoint_every_steps = 0
  # When --workdir has no checkpoint yet, start from this one: a step
  # folder such as /runs/a/checkpoints/1200, a checkpoints folder or a work
  # directory (their latest complete step). Once the run has saved its own
  # checkpoints, reruns resume from those. A path that does not exist is an
  # error.
  config.resume_from = ''
  # Skip the update of a step whose gradients are NaN or infinite
  # (optax.apply_if_finite) instead of stopping, and count these steps as
  # skipped_updates in metrics.jsonl. More than max_consecutive_skips
  # non-finite steps in a row still stop the run.
  config.skip_nonfinite_updates = False
  config.max_consecutive_skips = 10
  config.seed = 0
  return config


def polynomial_config(
  dataset: str, model: str, degree: int, width: int, num_epochs: int
) -> ml_collections.ConfigDict:
  """Return the recipe the CCP and NCP experiments share.

  Adam at batch 128 with a one-cycle schedule (10% linear warm-up to lr
  1e-3, then cosine decay), PyTorch's initialisation, pixels in [0, 1].

  Args:
    dataset: 'mnist' or 'cifar10'.
    model: a registered CCP or NCP model, such as 'ccp_dense'.
    degree: the polynomial degree N.
    width: features of the polynomial layer.
    num_epochs: passes over the training split.
  """
  config = default_config()
  config.dataset = dataset
  config.model = model
  config.model_kwargs = ml_collections.ConfigDict(
    {'width': width, 'degree': degree, 'init_scheme': 'pytorch'}
  )
  config.batch_size = 128
  config.schedule = 'one_cycle'
  config.warmup_fraction = 0.1
  config.num_epochs = num_epochs
  return config


def resnet_config(
  dataset: str,
  model: str,
  width: int,
  num_epochs: int,
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2),
) -> ml_collections.ConfigDict:
  """Return the recipe the Π-net ResNet experiments share.

  SGD with momentum 0.9 and weight decay 5e-4 at batch 128, and a
  one-cycle schedule: 5% linear warm-up to lr 0.1, then cosine decay.
  Inputs are standardised per channel, and CIFAR-10 images are also
  randomly cropped and flipped.

  Args:
    dataset: 'mnist' or 'cifar10'.
    model: a registered ResNet, such as 'pi_resnet'.
    width: channels of the first stage; ResNet-18 has 64.
    num_epochs: passes over the training split.
    stage_sizes: residual blocks per stage.
  """
  config = default_config()
  config.dataset = dataset
  config.model = model
  config.model_kwargs = ml_collections.ConfigDict(
    {'width': width, 'stage_sizes': stage_sizes}
  )
  config.normalize = True
  config.augment = dataset == 'cifar10'
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.schedule = 'one_cycle'
  config.warmup_fraction = 0.05
  config.num_epochs = num_epochs
  return config


def _first_names(names: list[str], limit: int = 5) -> str:
  """Return the first `limit` of `names`, and how many more there are."""
  more = len(names) - limit
  return f'{names[:limit]}' + (f' and {more} more' if more > 0 else '')


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first invalid field of `config`."""
  missing = sorted(set(default_config().keys()) - set(config.keys()))
  _require(
    not missing,
    f'config field(s) {_first_names(missing)} missing: a config file must '
    'start from pinet_jax.config.default_config() and override its fields',
  )
  unknown = sorted(set(config.keys()) - set(default_config().keys()))
  _require(
    not unknown,
    f'unknown config field(s) {_first_names(unknown)}: a config file sets a '
    'field that default_config() does not have; check its spelling against '
    'pinet_jax/config.py',
  )
  for name in FLOAT_FIELDS:
    value = config[name]
    _require(
      isinstance(value, int | float) and math.isfinite(value),
      f'--config.{name} must be a finite number, got {value}',
    )
  _require(
    config.dataset in DATASETS,
    f'unknown dataset {config.dataset!r}; set --config.dataset to one of '
    f'{list(DATASETS)}',
  )
  _require(
    config.optimizer in OPTIMIZERS,
    f'unknown optimizer {config.optimizer!r}; set --config.optimizer to one '
    f'of {list(OPTIMIZERS)}',
  )
  _require(
    config.schedule in SCHEDULES,
    f'unknown schedule {config.schedule!r}; set --config.schedule to one of '
    f'{list(SCHEDULES)}',
  )
  for name in ('learning_rate', 'batch_size', 'eval_batch_size', 'num_epochs'):
    _require(
      config[name] > 0,
      f'--config.{name} must be positive, got {config[name]}',
    )
  for name in ('log_every_steps', 'keep_checkpoints', 'max_consecutive_skips'):
    _require(
      config[name] >= 1, f'--config.{name} must be >= 1, got {config[name]}'
    )
  _require(
    0.0 <= config.warmup_fraction < 1.0,
    f'--config.warmup_fraction must be in [0, 1), got {config.warmup_fraction}',
  )
  _require(
    0.0 <= config.label_smoothing < 1.0,
    f'--config.label_smoothing must be in [0, 1), got {config.label_smoothing}',
  )
  _require(
    config.dtype in DTYPES,
    f'unknown dtype {config.dtype!r}; set --config.dtype to one of '
    f'{list(DTYPES)}',
  )
  _require(
    config.matmul_precision in MATMUL_PRECISIONS,
    f'unknown matmul precision {config.matmul_precision!r}; set '
    f'--config.matmul_precision to one of {list(MATMUL_PRECISIONS)}',
  )
  if config.schedule == 'step':
    fractions = tuple(config.decay_fractions)
    _require(
      bool(fractions)
      and all(0 < f < 1 for f in fractions)
      and list(fractions) == sorted(set(fractions)),
      "--config.schedule='step' needs --config.decay_fractions, increasing "
      f'fractions of the run in (0, 1) such as (0.5, 0.75), got {fractions}',
    )
    _require(
      0 < config.decay_factor < 1,
      f'--config.decay_factor must be in (0, 1), got {config.decay_factor}',
    )
  # 'constant' and 'cosine' ignore warmup_fraction, as they always have, so
  # that their existing work directories still resume.
  _require(
    config.schedule != 'step' or config.warmup_fraction == 0,
    "--config.schedule='step' has no warm-up; set "
    f'--config.warmup_fraction=0 (got {config.warmup_fraction}) or use '
    "--config.schedule='one_cycle'",
  )
  _require(
    0.0 <= config.momentum < 1.0,
    f'--config.momentum must be in [0, 1), got {config.momentum}',
  )
  _require(
    config.grad_clip_norm >= 0,
    f'--config.grad_clip_norm must be >= 0 (0 turns clipping off), got '
    f'{config.grad_clip_norm}',
  )
  _require(
    config.crop_padding >= 0,
    f'--config.crop_padding must be >= 0, got {config.crop_padding}',
  )
  _require(
    config.weight_decay >= 0.0,
    f'--config.weight_decay must be >= 0, got {config.weight_decay}',
  )
  _require(
    config.microbatch_size == 0
    or (
      config.microbatch_size > 0
      and config.batch_size % config.microbatch_size == 0
    ),
    f'--config.microbatch_size={config.microbatch_size} must be 0 '
    '(automatic) or a positive divisor of '
    f'--config.batch_size={config.batch_size}',
  )
  _require(
    config.checkpoint_every_steps >= 0,
    '--config.checkpoint_every_steps must be >= 0 (0 saves after each '
    f'epoch only), got {config.checkpoint_every_steps}',
  )
  _require(
    config.seed >= 0,
    f'--config.seed must be a non-negative integer, got {config.seed}',
  )
  _require(
    config.model in models.list_models(),
    f'unknown model {config.model!r}; set --config.model to one of '
    f'{models.list_models()}',
  )


def matmul_precision(
  config: ml_collections.ConfigDict,
) -> contextlib.AbstractContextManager:
  """Return the context that applies config.matmul_precision to compiles.

  Programs traced inside it use the precision; 'default', and configs
  saved before the option existed, leave JAX's setting as it is.
  """
  name = config.get('matmul_precision', 'default')
  if name == 'default':
    return contextlib.nullcontext()
  return jax.default_matmul_precision(name)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype | None:
  """Return the train and eval steps' compute dtype; None keeps float32.

  Configs saved before the option existed computed in float32.
  """
  name = config.get('dtype', 'float32')
  return None if name == 'float32' else jnp.dtype(name)
