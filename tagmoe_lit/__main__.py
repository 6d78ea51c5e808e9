"""`python -m tagmoe_lit {fit,validate,test,predict} --config experiments/base.yaml`."""

from tagmoe_lit.cli import main

if __name__ == "__main__":
    main()
