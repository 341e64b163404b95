# Finds polyattn's dependencies; shared by the build tree and the installed package config.
#
# Debian 12's xsimd 8.1 package exports `xsimd` with INTERFACE_LINK_LIBRARIES "xtl" but
# neither depends on xtl-dev nor looks xtl up, so a bare find_package(xsimd) leaves the
# linker with "-lxtl". polyattn uses no xtl feature: when xtl is not installed, an empty
# imported target stands in for it.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.3 NO_MODULE)
if(NOT TARGET xtl)
  find_package(xtl QUIET)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
find_dependency(xsimd)
