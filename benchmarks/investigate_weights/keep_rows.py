"""Row 507 of the reader weights vs the other rows, and output errors (ort rule, pc / g32), for float,
rot_r1 and keep507_r1 on four linears (grams from grams.py)."""
import sys; sys.path.insert(0, __import__('os').path.dirname(__file__))
import numpy as np, evalkit as E, grams as G, quantizers as Q
for v in ['float','rot_r1','keep507_r1']:
    m=E.Model(G.model_path(v)); st=G.load(v)
    for key in ['layers.5.q','layers.15.gate','layers.15.v','layers.20.up']:
        w=m.weight(key); H=st[f"gram/{G.role(key)}"].astype(np.float64)
        ra=np.abs(w).max(1); 
        print(v,key,'row507 max/median row max %.1f'%(ra[507]/np.median(ra)), 'out err ort pc %.4f g32 %.4f'%(Q.output_error(w,Q.quantize('ort',w,None),H),Q.output_error(w,Q.quantize('ort',w,32),H)))
