"""SQNR metric on models."""

import numpy as np

import tfacd
from tests.conftest import compile_model


def test_measure_reports_every_quantizer_and_rises_with_bits(tiny_model, tiny_data):
    x, _ = tiny_data
    means = {}
    for bits in (2, 4, 8):
        qat = tfacd.quantize_model(tiny_model, weight_bits=bits, activation_bits=bits,
                                   first_last_bits=None)
        tfacd.calibrate(qat, x)
        values = tfacd.sqnr.measure(qat, x)
        assert len(values) == len(tfacd.list_quantizers(qat))
        assert all(np.isfinite(v) for v in values.values())
        means[bits] = tfacd.sqnr.mean_sqnr(qat, x)
    # Each extra bit is worth about 6 dB.
    assert means[2] + 6 < means[4] < means[8] - 12


def test_monitor_puts_sqnr_in_the_history(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    compile_model(qat)
    history = qat.fit(x, y, epochs=2, verbose=0, callbacks=[tfacd.sqnr.SQNRMonitor(x[:16])])
    for key in ("mean_sqnr_db", "weight_sqnr_db", "activation_sqnr_db"):
        assert len(history.history[key]) == 2 and np.isfinite(history.history[key]).all()


def test_set_loss_weight_spreads_the_weight_over_quantizers(tiny_model):
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    count = tfacd.sqnr.set_loss_weight(qat, 0.3)
    assert count == len(tfacd.list_quantizers(qat))
    assert all(abs(i.quantizer.sqnr_loss_weight - 0.3 / count) < 1e-12
               for i in tfacd.list_quantizers(qat))
