"""Output error of RTN rules vs GPTQ on three rot_r1 linears (layer 15 gate, v, down); grams from grams.py."""
import sys, time; sys.path.insert(0, __import__('os').path.dirname(__file__))
import numpy as np, evalkit as E, grams as G, quantizers as Q, gptq
st=G.load('rot_r1'); m=E.Model(G.model_path('rot_r1'))
for key in ['layers.15.gate','layers.15.v','layers.15.down']:
    w=m.weight(key); H=st[f"gram/{G.role(key)}"].astype(np.float64)
    for r,g in [('ort',None),('mse',None),('ort',32)]:
        print(key,r,g,'out err',Q.output_error(w,Q.quantize(r,w,g),H))
    for r,g in [('gptq',None),('gptq_mse',None),('gptq_ort',None),('gptq_ort',32)]:
        t=time.time(); q=gptq.gptq(w,H,g,r); print(key,r,g,'out err',Q.output_error(w,q,H), 'w err', Q.weight_error(w,q), f'{time.time()-t:.1f}s')
