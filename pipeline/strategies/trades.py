"""`trades`: TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' maximising the KL term."""

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.strategies import Batch, Strategy, StrategyParams


class TradesParams(StrategyParams):
    # SIP-AT's authors (Temp_CVPR train_model.py) call trades_loss without β: its default 1.0 (yaodongyu/TRADES
    # trades.py); TRADES' own CIFAR script uses --beta 6.0 (train_trades_cifar10.py; recipe=baselines)
    beta: float = Field(1.0, ge=0.0)


def trades_kl(logits_adv, logits_clean):
    """Batch-mean KL(softmax(clean) ‖ softmax(adv)), as in the reference implementation."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


class Trades(Strategy, name="trades"):
    Params = TradesParams

    def loss(self, model, batch: Batch):
        net = getattr(model, "module", model)
        net.eval()  # the inner maximisation targets the eval-mode prediction, like the reference code
        with torch.no_grad():
            p_clean = F.softmax(net(batch.x), dim=1)
        net.train()
        kl_to_clean = lambda logits, _y: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")  # noqa: E731
        # TRADES starts at x + N(0, 0.001²) (trades.py), not at a uniform point of the ball
        x_adv = self.adversarial(model, batch, init="normal", init_std=0.001, loss_fn=kl_to_clean)
        # three train-mode passes, clean, adversarial, clean, as trades.py: the second clean pass gives the same
        # logits and gradients as the first, but batch norm's running statistics see the clean batch twice
        logits_clean = model(batch.x)
        logits_adv = model(x_adv)
        logits_clean_kl = model(batch.x)
        return F.cross_entropy(logits_clean, batch.y) + self.params.beta * trades_kl(logits_adv, logits_clean_kl)
