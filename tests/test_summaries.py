"""TensorBoard writer: tags, skipped fields and the non-writing processes."""

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from pinet_jax import summaries


@pytest.mark.parametrize(
  ('key', 'expected'),
  [
    ('train_loss', 'train/loss'),
    ('train_accuracy', 'train/accuracy'),
    ('eval_loss', 'eval/loss'),
    ('eval_accuracy', 'eval/accuracy'),
    ('images_per_second', 'train/images_per_second'),
    ('learning_rate', 'train/learning_rate'),
    ('grad_norm', 'train/grad_norm'),
  ],
)
def test_tag(key, expected):
  assert summaries.tag(key) == expected


def test_write_record_skips_bookkeeping(tmp_path):
  writer = summaries.create_writer(str(tmp_path), enabled=True)
  try:
    summaries.write_record(
      writer,
      {
        'step': 7,
        'epoch': 0.5,
        'time': 1.0e9,
        'eval_count': 500.0,
        'eval_accuracy': 0.25,
        'train_loss': None,
        'note': 'text',
        'finite': True,
      },
    )
    summaries.write_record(writer, {'event': 'start', 'step': 0, 'time': 1.0})
  finally:
    writer.close()
  accumulator = event_accumulator.EventAccumulator(
    str(tmp_path), size_guidance={event_accumulator.TENSORS: 0}
  )
  accumulator.Reload()
  assert accumulator.Tags()['tensors'] == ['eval/accuracy']
  (event,) = accumulator.Tensors('eval/accuracy')
  assert event.step == 7
  assert float(tensor_util.make_ndarray(event.tensor_proto)) == 0.25


def test_disabled_writer_writes_no_file(tmp_path):
  writer = summaries.create_writer(str(tmp_path), enabled=False)
  summaries.write_record(writer, {'step': 1, 'train_loss': 1.0})
  writer.close()
  assert list(tmp_path.iterdir()) == []
