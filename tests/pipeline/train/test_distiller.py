import pytest
import torch
from transformers import AutoModelForCausalLM

from dskd.pipeline.losses.registry import build_loss
from dskd.pipeline.losses.signals import TeacherSignal
from dskd.pipeline.train.collate import collate_tokens
from dskd.pipeline.train.distiller import Distiller


@pytest.mark.parametrize("name", ["student", "student_gpt2"])
def test_lazy_logits_give_the_same_loss_and_grads_as_the_full_forward(toy_world, name):
    """The decoder-only path (head applied per chunk in the loss) equals model(...).logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(getattr(toy_world, name))
    V, D = model.config.vocab_size, model.config.get_text_config().hidden_size
    t = collate_tokens([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [2, 1], pad_id=0)
    teacher = TeacherSignal(labels=t["labels"], input_ids=t["input_ids"],
                            hidden=torch.randn(2, 5, 16), head_weight=torch.randn(V, 16))
    out = {}
    for lazy in (False, True):
        torch.manual_seed(1)  # same projector init on both paths
        loss = build_loss("dskd", d_student=D, d_teacher=16)
        m = Distiller(model, loss, lazy_logits=lazy)
        model.zero_grad()
        res = m(t, teacher, 4.0)
        res.loss.backward()
        out[lazy] = (res.loss.detach(), model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)
